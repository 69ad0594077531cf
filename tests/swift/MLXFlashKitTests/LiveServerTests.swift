import XCTest
@testable import MLXFlashKit

/// Talks to the real `python -m mlx_flash.server`, started with `ServerProcess`.
///
/// Runs when `MLX_FLASH_PYTHON` names a Python with mlx_flash installed (the Makefile
/// sets it to `.venv/bin/python`); the model is `MLX_FLASH_TEST_MODEL`, by default
/// "smollm2-135m". Without `MLX_FLASH_PYTHON` the test is skipped, or fails when `CI`
/// or `MLX_FLASH_REQUIRE_LIVE` is set.
@MainActor
final class LiveServerTests: XCTestCase {
    /// The repository root, found from this file's path (tests/swift/MLXFlashKitTests/).
    static let repositoryRoot = URL(fileURLWithPath: #filePath)
        .deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent().deletingLastPathComponent()

    private func livePython() throws -> String {
        let env = ProcessInfo.processInfo.environment
        if let python = env["MLX_FLASH_PYTHON"], !python.isEmpty { return python }
        let required = [env["CI"], env["MLX_FLASH_REQUIRE_LIVE"]].contains { value in
            guard let value else { return false }
            return !value.isEmpty && value != "0" && value.lowercased() != "false"
        }
        if required {
            XCTFail("""
                MLX_FLASH_PYTHON is not set, so the live server test cannot run: set it to a Python \
                with mlx_flash installed (make test-swift sets MLX_FLASH_PYTHON=$(PWD)/.venv/bin/python)
                """)
            throw LiveTestNotRun()
        }
        throw XCTSkip("MLX_FLASH_PYTHON is not set; set it to .venv/bin/python to test against the real server")
    }

    private struct LiveTestNotRun: Error {}

    func testRealServer() async throws {
        let python: String
        do {
            python = try livePython()
        } catch is LiveTestNotRun {
            return
        }
        let model = ProcessInfo.processInfo.environment["MLX_FLASH_TEST_MODEL"].flatMap { $0.isEmpty ? nil : $0 }
            ?? "smollm2-135m"
        let log = FileManager.default.temporaryDirectory
            .appendingPathComponent("mlx-flash-live-\(UUID().uuidString).log")
        let configuration = ServerProcess.Configuration(
            python: python, model: model, port: try Socket.freePort(), startupTimeout: 300, logFile: log,
            workingDirectory: Self.repositoryRoot)
        let server = ServerProcess()
        do {
            try await server.start(configuration)
        } catch {
            XCTFail("the server did not start: \(error.localizedDescription)\n--- server log ---\n\(server.logTail())")
            return
        }
        do {
            let client = OpenAIClient(baseURL: configuration.baseURL, timeout: 300)
            let served = try await checkModels(client)
            try await checkChatAndStream(client, model: served)
            try await checkBadModel(client)
            try await checkCancelledStream(client, model: served)
            try await checkChatSession(configuration.baseURL, model: served)
        } catch {
            XCTFail("\(error.localizedDescription)\n--- server log ---\n\(server.logTail())")
        }
        await server.stop()
        XCTAssertEqual(server.state, .stopped)
        try? FileManager.default.removeItem(at: log)
    }

    // MARK: Checks

    /// `GET /v1/models` lists at least one model; returns the name to ask for.
    private func checkModels(_ client: OpenAIClient) async throws -> String {
        let models = try await client.models()
        XCTAssertFalse(models.isEmpty, "GET /v1/models lists no model")
        return try XCTUnwrap(models.first?.id)
    }

    private func request(_ model: String, _ prompt: String, maxTokens: Int) -> ChatCompletionRequest {
        ChatCompletionRequest(
            model: model, messages: [ChatMessage(role: .user, content: prompt)], maxTokens: maxTokens,
            temperature: 0, topP: 1, seed: 0)
    }

    private func checkChatAndStream(_ client: OpenAIClient, model: String) async throws {
        let prompt = request(model, "Write one sentence about the sea.", maxTokens: 16)

        let response = try await client.chat(prompt)
        XCTAssertFalse(response.content.isEmpty, "the completion has no text")
        XCTAssertNotNil(response.choices.first?.finishReason)
        let usage = try XCTUnwrap(response.usage, "the completion has no usage")
        XCTAssertGreaterThan(usage.promptTokens, 0)
        XCTAssertGreaterThan(usage.completionTokens, 0)
        XCTAssertLessThanOrEqual(usage.completionTokens, 16)
        XCTAssertEqual(usage.totalTokens, usage.promptTokens + usage.completionTokens)
        XCTAssertNotNil(response.flash, "the completion has no \"flash\" statistics")

        var deltas: [ChatDelta] = []
        for try await delta in client.streamChat(prompt) { deltas.append(delta) }
        let texts = deltas.map(\.content).filter { !$0.isEmpty }
        XCTAssertGreaterThan(texts.count, 1, "the stream sent its reply in one piece: \(texts)")
        XCTAssertNotNil(deltas.last?.finishReason, "the last chunk has no finish_reason")
        XCTAssertEqual(deltas.compactMap(\.finishReason).count, 1, "finish_reason appears once")
        // Greedy decoding: streaming and not streaming give the same text.
        XCTAssertEqual(texts.joined(), response.content)
    }

    private func checkBadModel(_ client: OpenAIClient) async throws {
        do {
            _ = try await client.chat(request("no-such-model-\(UUID().uuidString)", "Hi", maxTokens: 4))
            XCTFail("a request for an unknown model succeeded")
        } catch let error as OpenAIClientError {
            guard case .api(let status, let detail) = error else {
                return XCTFail("expected an OpenAI-style error body, got \(error)")
            }
            XCTAssertTrue((400..<500).contains(status), "status \(status)")
            XCTAssertFalse(detail.message.isEmpty)
        }
    }

    /// Stopping a stream early leaves the server able to answer the next request.
    private func checkCancelledStream(_ client: OpenAIClient, model: String) async throws {
        let long = request(model, "Count from 1 to 1000, one number per line.", maxTokens: 400)
        var received = 0
        for try await delta in client.streamChat(long) where !delta.content.isEmpty {
            received += 1
            if received == 2 { break }
        }
        XCTAssertEqual(received, 2)
        let after = try await client.chat(request(model, "Say hi.", maxTokens: 4))
        XCTAssertNotNil(after.usage)
    }

    private func checkChatSession(_ url: URL, model: String) async throws {
        let chat = ChatSession(settings: Settings(
            serverURL: url, model: model, temperature: 0, maxTokens: 12, pythonPath: "python3"))
        await chat.send("Name a colour.").value
        XCTAssertNil(chat.lastError)
        XCTAssertEqual(chat.conversation.messages.map(\.role), [.user, .assistant])
        XCTAssertFalse(chat.conversation.messages.last?.content.isEmpty ?? true)
        let stats = try XCTUnwrap(chat.lastStats)
        XCTAssertGreaterThan(stats.tokensPerSecond ?? 0, 0)
    }
}
