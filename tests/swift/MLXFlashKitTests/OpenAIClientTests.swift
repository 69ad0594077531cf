import XCTest
@testable import MLXFlashKit

/// The client over a real socket, against `StubHTTPServer`.
final class OpenAIClientTests: XCTestCase {
    static let modelsJSON = #"{"object": "list", "data": [{"id": "stub-model", "object": "model"}]}"#

    static func chunk(_ content: String?, finish: String? = nil, flash: String? = nil) -> String {
        let delta = content.map { #"{"content": \#(String(reflecting: $0))}"# } ?? "{}"
        let reason = finish.map { "\"\($0)\"" } ?? "null"
        let extra = flash.map { #", "flash": \#($0)"# } ?? ""
        return #"data: {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": \#(delta), "finish_reason": \#(reason)}]\#(extra)}"#
            + "\n\n"
    }

    static let flashJSON = #"{"tokens_per_second": 33.0, "ms_per_token": 30.3, "bytes_read_per_token": 2500000, "mode": "flash"}"#

    static let helloStream = chunk("Hel") + chunk("lo") + chunk(" wörld 🌍")
        + chunk(nil, finish: "stop", flash: flashJSON) + "data: [DONE]\n\n"

    private func collect(_ stream: AsyncThrowingStream<ChatDelta, Error>) async throws -> [ChatDelta] {
        var out: [ChatDelta] = []
        for try await delta in stream { out.append(delta) }
        return out
    }

    private func request(stream: Bool = false) -> ChatCompletionRequest {
        ChatCompletionRequest(
            model: "stub-model", messages: [ChatMessage(role: .user, content: "Hi")], maxTokens: 8,
            temperature: 0, stream: stream)
    }

    // MARK: Non-streaming

    func testModels() async throws {
        let server = try stubServer { _ in .json(Self.modelsJSON) }
        let models = try await OpenAIClient(baseURL: server.baseURL).models()
        XCTAssertEqual(models.map(\.id), ["stub-model"])
        XCTAssertEqual(server.requests.first?.method, "GET")
        XCTAssertEqual(server.requests.first?.path, "/v1/models")
    }

    func testChat() async throws {
        let server = try stubServer { _ in
            .json("""
                {"choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi there"}, "finish_reason": "stop"}],
                 "usage": {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}, "flash": \(Self.flashJSON)}
                """)
        }
        let response = try await OpenAIClient(baseURL: server.baseURL).chat(request(stream: true))
        XCTAssertEqual(response.content, "Hi there")
        XCTAssertEqual(response.usage?.totalTokens, 6)
        XCTAssertEqual(response.flash?.bytesReadPerToken, 2_500_000)

        let sent = try XCTUnwrap(server.requests.first)
        XCTAssertEqual(sent.method, "POST")
        XCTAssertEqual(sent.path, "/v1/chat/completions")
        XCTAssertEqual(sent.headers["content-type"], "application/json")
        XCTAssertEqual(sent.json?["stream"] as? Bool, false, "chat() always asks for a whole answer")
        XCTAssertEqual(sent.json?["max_tokens"] as? Int, 8)
    }

    func testOpenAIErrorBecomesTypedError() async throws {
        let server = try stubServer { _ in
            .json(#"{"error": {"message": "model 'nope' is not served here", "type": "invalid_request_error", "code": "model_not_found"}}"#,
                  status: 404)
        }
        do {
            _ = try await OpenAIClient(baseURL: server.baseURL).chat(request())
            XCTFail("expected an error")
        } catch let error as OpenAIClientError {
            XCTAssertEqual(error.status, 404)
            XCTAssertEqual(error.message, "model 'nope' is not served here")
            XCTAssertEqual(error.localizedDescription, "model 'nope' is not served here")
        }
    }

    func testNonJSONErrorBody() async throws {
        let server = try stubServer { _ in
            .full(status: 500, contentType: "text/plain", body: Data("boom".utf8))
        }
        do {
            _ = try await OpenAIClient(baseURL: server.baseURL).models()
            XCTFail("expected an error")
        } catch let error as OpenAIClientError {
            XCTAssertEqual(error, .http(status: 500, body: "boom"))
        }
    }

    func testUnreadableAnswer() async throws {
        let server = try stubServer { _ in .json("[1, 2]") }
        do {
            _ = try await OpenAIClient(baseURL: server.baseURL).models()
            XCTFail("expected an error")
        } catch let error as OpenAIClientError {
            guard case .decoding = error else { return XCTFail("expected .decoding, got \(error)") }
        }
    }

    func testConnectionRefused() async throws {
        let port = try Socket.freePort()
        let client = OpenAIClient(baseURL: URL(string: "http://127.0.0.1:\(port)")!, timeout: 5)
        do {
            _ = try await client.models()
            XCTFail("expected an error")
        } catch let error as OpenAIClientError {
            guard case .transport(let text) = error else { return XCTFail("expected .transport, got \(error)") }
            XCTAssertTrue(text.contains("127.0.0.1:\(port)"), text)
        }
        do {
            _ = try await collect(client.streamChat(request()))
            XCTFail("expected an error")
        } catch let error as OpenAIClientError {
            guard case .transport = error else { return XCTFail("expected .transport, got \(error)") }
        }
    }

    func testCancellingChatCancelsTheRequest() async throws {
        let server = try stubServer { _ in .events(": waiting\n\n", hold: true) }
        let client = OpenAIClient(baseURL: server.baseURL)
        let request = request()
        let task = Task { try await client.chat(request) }
        XCTAssertTrue(server.wait { server.requests.count == 1 })
        task.cancel()
        do {
            _ = try await task.value
            XCTFail("expected cancellation")
        } catch {
            XCTAssertTrue(error is CancellationError, "\(error)")
        }
        XCTAssertTrue(server.wait { server.disconnects == 1 }, "the server sees the connection close")
    }

    // MARK: Streaming

    func testStream() async throws {
        let server = try stubServer { _ in .events(Self.helloStream) }
        let deltas = try await collect(OpenAIClient(baseURL: server.baseURL).streamChat(request()))
        XCTAssertEqual(deltas.map(\.content).joined(), "Hello wörld 🌍")
        XCTAssertEqual(deltas.count, 4)
        XCTAssertEqual(deltas.last?.finishReason, "stop")
        XCTAssertEqual(deltas.last?.flash?.tokensPerSecond, 33)
        let sent = try XCTUnwrap(server.requests.first)
        XCTAssertEqual(sent.json?["stream"] as? Bool, true)
        XCTAssertEqual(sent.headers["accept"], "text/event-stream")
    }

    /// Network writes split inside events, JSON and UTF-8 characters, with pauses so
    /// that they arrive as separate reads.
    func testStreamSplitAcrossWrites() async throws {
        let server = try stubServer { _ in .events(Self.helloStream, splitEvery: 7, delay: 0.002) }
        let deltas = try await collect(OpenAIClient(baseURL: server.baseURL).streamChat(request()))
        XCTAssertEqual(deltas.map(\.content), ["Hel", "lo", " wörld 🌍", ""])
    }

    func testStreamArrivesIncrementally() async throws {
        // The second delta is only written 0.5 s after the first: the first must be
        // delivered before then, not when the body completes.
        let server = try stubServer { _ in
            .stream(pieces: [Data(Self.chunk("first").utf8),
                             Data((Self.chunk("second", finish: "stop") + "data: [DONE]\n\n").utf8)],
                    delay: 0.5, hold: false)
        }
        let start = Date()
        var times: [TimeInterval] = []
        for try await _ in OpenAIClient(baseURL: server.baseURL).streamChat(request()) {
            times.append(Date().timeIntervalSince(start))
        }
        XCTAssertEqual(times.count, 2)
        XCTAssertLessThan(times[0] + 0.3, times[1], "deltas arrive as they are written: \(times)")
    }

    func testStreamErrorStatus() async throws {
        let server = try stubServer { _ in
            .json(#"{"error": {"message": "max_tokens must be positive", "type": "invalid_request_error", "code": null}}"#, status: 400)
        }
        do {
            _ = try await collect(OpenAIClient(baseURL: server.baseURL).streamChat(request()))
            XCTFail("expected an error")
        } catch let error as OpenAIClientError {
            XCTAssertEqual(error.status, 400)
            XCTAssertEqual(error.message, "max_tokens must be positive")
        }
    }

    func testErrorInsideStream() async throws {
        let server = try stubServer { _ in
            .events(Self.chunk("partial") + #"data: {"error": {"message": "out of memory", "type": "server_error"}}"# + "\n\n")
        }
        var received: [String] = []
        do {
            for try await delta in OpenAIClient(baseURL: server.baseURL).streamChat(request()) {
                received.append(delta.content)
            }
            XCTFail("expected an error")
        } catch let error as OpenAIClientError {
            XCTAssertEqual(error.message, "out of memory")
        }
        XCTAssertEqual(received, ["partial"])
    }

    func testStreamWithoutDoneButFinished() async throws {
        let server = try stubServer { _ in .events(Self.chunk("a") + Self.chunk(nil, finish: "length")) }
        let deltas = try await collect(OpenAIClient(baseURL: server.baseURL).streamChat(request()))
        XCTAssertEqual(deltas.last?.finishReason, "length")
    }

    func testTruncatedStreamIsAnError() async throws {
        let server = try stubServer { _ in .events(Self.chunk("a")) }
        do {
            _ = try await collect(OpenAIClient(baseURL: server.baseURL).streamChat(request()))
            XCTFail("expected an error")
        } catch let error as OpenAIClientError {
            guard case .transport = error else { return XCTFail("expected .transport, got \(error)") }
        }
    }

    func testUnreadableChunk() async throws {
        let server = try stubServer { _ in .events("data: {not json}\n\n") }
        do {
            _ = try await collect(OpenAIClient(baseURL: server.baseURL).streamChat(request()))
            XCTFail("expected an error")
        } catch let error as OpenAIClientError {
            guard case .decoding = error else { return XCTFail("expected .decoding, got \(error)") }
        }
    }

    /// Cancelling the consuming task closes the connection, which is how the server
    /// learns to stop generating.
    func testCancellingTheConsumerClosesTheConnection() async throws {
        let server = try stubServer { _ in .events(Self.chunk("tok"), hold: true) }
        let client = OpenAIClient(baseURL: server.baseURL)
        let (firstDeltaSeen, firstDelta) = AsyncStream<Void>.makeStream()
        let request = request()
        let consumer = Task {
            var count = 0
            for try await _ in client.streamChat(request) {
                count += 1
                firstDelta.yield()
            }
            return count
        }
        for await _ in firstDeltaSeen { break }
        consumer.cancel()
        let count = try await consumer.value
        XCTAssertEqual(count, 1)
        XCTAssertTrue(server.wait { server.disconnects == 1 }, "the server sees the connection close")
    }

    func testBreakingOutOfTheLoopClosesTheConnection() async throws {
        let server = try stubServer { _ in .events(Self.chunk("a") + Self.chunk("b"), hold: true) }
        for try await _ in OpenAIClient(baseURL: server.baseURL).streamChat(request()) { break }
        XCTAssertTrue(server.wait { server.disconnects == 1 }, "the server sees the connection close")
    }
}
