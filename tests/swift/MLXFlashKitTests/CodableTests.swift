import XCTest
@testable import MLXFlashKit

final class CodableTests: XCTestCase {
    private func decode<T: Decodable>(_ type: T.Type, _ json: String) throws -> T {
        try JSONDecoder().decode(type, from: Data(json.utf8))
    }

    private func jsonObject<T: Encodable>(_ value: T) throws -> [String: Any] {
        let data = try JSONEncoder().encode(value)
        return try XCTUnwrap(try JSONSerialization.jsonObject(with: data) as? [String: Any])
    }

    // MARK: Requests

    func testRequestUsesSnakeCaseAndOmitsUnsetFields() throws {
        let request = ChatCompletionRequest(
            model: "smollm2-135m",
            messages: [ChatMessage(role: .system, content: "Be brief."), ChatMessage(role: .user, content: "Hi")],
            maxTokens: 16, temperature: 0.5, topP: 0.9, seed: 3, stop: ["\n\n"], stream: true)
        let object = try jsonObject(request)
        XCTAssertEqual(Set(object.keys), ["model", "messages", "max_tokens", "temperature", "top_p", "seed", "stop", "stream"])
        XCTAssertEqual(object["max_tokens"] as? Int, 16)
        XCTAssertEqual(object["top_p"] as? Double, 0.9)
        XCTAssertEqual(object["stream"] as? Bool, true)
        let messages = try XCTUnwrap(object["messages"] as? [[String: String]])
        XCTAssertEqual(messages, [["role": "system", "content": "Be brief."], ["role": "user", "content": "Hi"]],
                       "messages carry role and content only, not the local id")

        let minimal = try jsonObject(ChatCompletionRequest(model: "m", messages: []))
        XCTAssertEqual(Set(minimal.keys), ["model", "messages"])
    }

    func testRequestRoundTrip() throws {
        let request = ChatCompletionRequest(
            model: "m", messages: [ChatMessage(role: .user, content: "x")], maxTokens: 8, stream: false)
        let back = try JSONDecoder().decode(ChatCompletionRequest.self, from: JSONEncoder().encode(request))
        XCTAssertEqual(back, request)
    }

    // MARK: Responses

    func testResponseWithFlashStats() throws {
        let response = try decode(ChatCompletionResponse.self, """
            {"id": "chatcmpl-1", "object": "chat.completion", "created": 1700000000, "model": "smollm2-135m",
             "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello!"}, "finish_reason": "stop"}],
             "usage": {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15},
             "flash": {"tokens_per_second": 41.5, "ms_per_token": 24.1, "bytes_read_per_token": 1048576, "mode": "flash",
                       "something_new": [1, 2]}}
            """)
        XCTAssertEqual(response.content, "Hello!")
        XCTAssertEqual(response.choices.first?.finishReason, "stop")
        XCTAssertEqual(response.usage, Usage(promptTokens: 12, completionTokens: 3, totalTokens: 15))
        XCTAssertEqual(response.flash, FlashStats(tokensPerSecond: 41.5, msPerToken: 24.1, bytesReadPerToken: 1048576, mode: "flash"))
    }

    func testResponseWithoutFlashOrUsage() throws {
        let response = try decode(ChatCompletionResponse.self, """
            {"choices": [{"message": {"role": "assistant", "content": null}, "finish_reason": "length"}]}
            """)
        XCTAssertNil(response.flash)
        XCTAssertNil(response.usage)
        XCTAssertEqual(response.content, "")
        XCTAssertEqual(response.choices.first?.index, 0)
    }

    func testResponseRoundTrip() throws {
        let response = ChatCompletionResponse(
            id: "x", created: 1, model: "m",
            choices: [.init(message: ChatMessage(role: .assistant, content: "ok"), finishReason: "stop")],
            usage: Usage(promptTokens: 1, completionTokens: 2, totalTokens: 3),
            flash: FlashStats(tokensPerSecond: 10, mode: "dense"))
        let object = try jsonObject(response)
        XCTAssertNotNil(object["flash"] as? [String: Any])
        XCTAssertEqual((object["flash"] as? [String: Any])?["tokens_per_second"] as? Double, 10)
        XCTAssertEqual((object["usage"] as? [String: Any])?["prompt_tokens"] as? Int, 1)
        let back = try JSONDecoder().decode(ChatCompletionResponse.self, from: JSONEncoder().encode(response))
        XCTAssertEqual(back, response)
    }

    func testStreamChunks() throws {
        let first = try decode(ChatCompletionChunk.self, """
            {"id": "c", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"role": "assistant", "content": "He"}, "finish_reason": null}]}
            """)
        XCTAssertEqual(ChatDelta(chunk: first), ChatDelta(content: "He"))
        XCTAssertEqual(first.choices.first?.delta.role, .assistant)

        let last = try decode(ChatCompletionChunk.self, """
            {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
             "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12},
             "flash": {"tokens_per_second": 20.0, "ms_per_token": 50.0, "bytes_read_per_token": 0, "mode": "dense"}}
            """)
        let delta = ChatDelta(chunk: last)
        XCTAssertEqual(delta.content, "")
        XCTAssertEqual(delta.finishReason, "stop")
        XCTAssertEqual(delta.usage?.completionTokens, 7)
        XCTAssertEqual(delta.flash?.msPerToken, 50)

        let usageOnly = try decode(ChatCompletionChunk.self, #"{"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}"#)
        XCTAssertEqual(ChatDelta(chunk: usageOnly).content, "")
        let noChoices = try decode(ChatCompletionChunk.self, #"{"flash": {"mode": "flash"}}"#)
        XCTAssertEqual(noChoices.flash?.mode, "flash")
    }

    /// The first and last chunks exactly as mlx_flash.server sends them.
    func testServerChunksVerbatim() throws {
        let first = try decode(ChatCompletionChunk.self, """
            {"id": "chatcmpl-bac2", "object": "chat.completion.chunk", "created": 1795541164, "model": "smollm2-135m", "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}]}
            """)
        XCTAssertEqual(ChatDelta(chunk: first), ChatDelta(content: ""))
        let last = try decode(ChatCompletionChunk.self, """
            {"id": "chatcmpl-bac2", "object": "chat.completion.chunk", "created": 1795541164, "model": "smollm2-135m", "choices": [{"index": 0, "delta": {}, "logprobs": null, "finish_reason": "length"}], "usage": {"prompt_tokens": 31, "completion_tokens": 8, "total_tokens": 39}, "flash": {"mode": "dense", "tokens_per_second": 5.899336501993068, "ms_per_token": null, "prompt_tokens_per_second": 5.82884908049501, "bytes_read_per_token": 0, "peak_memory_gb": 0.11937894, "request": 0}}
            """)
        let delta = ChatDelta(chunk: last)
        XCTAssertEqual(delta.finishReason, "length")
        XCTAssertEqual(delta.usage, Usage(promptTokens: 31, completionTokens: 8, totalTokens: 39))
        XCTAssertEqual(delta.flash?.mode, "dense")
        XCTAssertNil(delta.flash?.msPerToken)
        XCTAssertEqual(delta.flash?.bytesReadPerToken, 0)
        XCTAssertEqual(delta.flash?.peakMemoryGB, 0.11937894)
    }

    func testChunkRoundTrip() throws {
        let chunk = ChatCompletionChunk(
            id: "c", choices: [.init(delta: .init(content: "x"), finishReason: "stop")],
            flash: FlashStats(tokensPerSecond: 1, msPerToken: 2, bytesReadPerToken: 3, mode: "flash"))
        let back = try JSONDecoder().decode(ChatCompletionChunk.self, from: JSONEncoder().encode(chunk))
        XCTAssertEqual(back, chunk)
    }

    func testModelList() throws {
        let list = try decode(ModelList.self, """
            {"object": "list", "data": [{"id": "smollm2-135m", "object": "model", "created": 0, "owned_by": "mlx-flash"}]}
            """)
        XCTAssertEqual(list.data.map(\.id), ["smollm2-135m"])
        XCTAssertEqual(list.data.first?.ownedBy, "mlx-flash")
        XCTAssertEqual(try decode(ModelList.self, #"{"data": [{"id": "a"}]}"#).data.first?.id, "a")
    }

    // MARK: Errors

    func testErrorBodies() throws {
        let body = try decode(APIErrorBody.self, """
            {"error": {"message": "model 'nope' not found", "type": "invalid_request_error", "param": "model", "code": "model_not_found"}}
            """)
        XCTAssertEqual(body.error, APIErrorDetail(message: "model 'nope' not found", type: "invalid_request_error", code: "model_not_found", param: "model"))

        let numeric = try decode(APIErrorBody.self, #"{"error": {"message": "bad", "type": "x", "code": 400}}"#)
        XCTAssertEqual(numeric.error.code, "400")
        let null = try decode(APIErrorBody.self, #"{"error": {"message": "bad", "code": null}}"#)
        XCTAssertNil(null.error.code)

        let back = try JSONDecoder().decode(APIErrorBody.self, from: JSONEncoder().encode(body))
        XCTAssertEqual(back, body)
    }

    func testClientErrorFromBody() {
        let api = OpenAIClientError.from(
            status: 404, body: Data(#"{"error": {"message": "unknown model 'x'", "type": "invalid_request_error", "code": "model_not_found"}}"#.utf8))
        XCTAssertEqual(api.message, "unknown model 'x'")
        XCTAssertEqual(api.status, 404)
        XCTAssertEqual(api.errorDescription, "unknown model 'x'")
        guard case .api(_, let detail) = api else { return XCTFail("expected .api, got \(api)") }
        XCTAssertEqual(detail.code, "model_not_found")

        let plain = OpenAIClientError.from(status: 500, body: Data("Internal Server Error".utf8))
        XCTAssertEqual(plain, .http(status: 500, body: "Internal Server Error"))
        XCTAssertEqual(plain.message, "HTTP status 500: Internal Server Error")
        XCTAssertEqual(OpenAIClientError.from(status: 502, body: Data()).message, "HTTP status 502")
    }

    func testMessageEqualityIgnoresLocalID() {
        XCTAssertEqual(ChatMessage(role: .user, content: "a"), ChatMessage(role: .user, content: "a"))
        XCTAssertNotEqual(ChatMessage(role: .user, content: "a"), ChatMessage(role: .assistant, content: "a"))
    }
}
