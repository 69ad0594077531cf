import XCTest
@testable import MLXFlashKit

@MainActor
final class ChatSessionTests: XCTestCase {
    private func session(_ server: StubHTTPServer, systemPrompt: String = "") -> ChatSession {
        ChatSession(settings: Settings(
            serverURL: server.baseURL, model: "stub-model", maxTokens: 16, pythonPath: "python3",
            systemPrompt: systemPrompt))
    }

    func testSendStreamsTheReplyIntoTheConversation() async throws {
        let server = try stubServer { _ in .events(OpenAIClientTests.helloStream, splitEvery: 11) }
        let chat = session(server, systemPrompt: "Be brief.")
        var changes = 0
        chat.onChange = { changes += 1 }

        let task = chat.send("  Hi  ")
        XCTAssertTrue(chat.isGenerating)
        XCTAssertEqual(chat.conversation.messages.map(\.role), [.system, .user, .assistant])
        await task.value

        XCTAssertFalse(chat.isGenerating)
        XCTAssertNil(chat.lastError)
        XCTAssertEqual(chat.conversation.messages.map(\.content), ["Be brief.", "Hi", "Hello wörld 🌍"])
        XCTAssertGreaterThan(changes, 3)
        let stats = try XCTUnwrap(chat.lastStats)
        XCTAssertEqual(stats.tokensPerSecond, 33)
        XCTAssertEqual(stats.bytesReadPerToken, 2_500_000)
        XCTAssertEqual(stats.mode, "flash")
        XCTAssertEqual(stats.finishReason, "stop")
        XCTAssertEqual(stats.completionTokens, 3)

        let sent = try XCTUnwrap(server.requests.first?.json)
        XCTAssertEqual(sent["model"] as? String, "stub-model")
        XCTAssertEqual(sent["max_tokens"] as? Int, 16)
        XCTAssertEqual(sent["stream"] as? Bool, true)
        let messages = try XCTUnwrap(sent["messages"] as? [[String: String]])
        XCTAssertEqual(messages.map { $0["role"] }, ["system", "user"], "the empty placeholder is not sent")
    }

    func testBlankInputAndSendWhileGeneratingAreIgnored() async throws {
        let server = try stubServer { _ in .events(OpenAIClientTests.helloStream, delay: 0.2) }
        let chat = session(server)
        await chat.send("   ").value
        XCTAssertTrue(chat.conversation.messages.isEmpty)
        let task = chat.send("one")
        await chat.send("two").value
        await task.value
        XCTAssertEqual(chat.conversation.messages.map(\.content), ["one", "Hello wörld 🌍"])
        XCTAssertEqual(server.requests.count, 1)
    }

    func testStopCancelsTheRequestAndKeepsThePartialReply() async throws {
        let server = try stubServer { _ in .events(OpenAIClientTests.chunk("Partial"), hold: true) }
        let chat = session(server)
        let task = chat.send("Tell me a long story")
        while chat.conversation.messages.last?.content != "Partial" {
            try await Task.sleep(nanoseconds: 10_000_000)
        }
        chat.stop()
        await task.value
        XCTAssertFalse(chat.isGenerating)
        XCTAssertNil(chat.lastError)
        XCTAssertEqual(chat.lastStats?.finishReason, "cancelled")
        XCTAssertEqual(chat.conversation.messages.map(\.content), ["Tell me a long story", "Partial"])
        XCTAssertTrue(server.wait { server.disconnects == 1 }, "the server sees the connection close")
    }

    func testServerErrorIsReportedAndEmptyReplyDropped() async throws {
        let server = try stubServer { _ in
            .json(#"{"error": {"message": "model 'stub-model' not found", "type": "invalid_request_error"}}"#, status: 404)
        }
        let chat = session(server)
        await chat.send("Hi").value
        XCTAssertEqual(chat.lastError, "model 'stub-model' not found")
        XCTAssertEqual(chat.conversation.messages.map(\.role), [.user])
        XCTAssertFalse(chat.isGenerating)
    }

    func testClientSideStatsWithoutFlashField() async throws {
        let stream = OpenAIClientTests.chunk("a") + OpenAIClientTests.chunk("b") + OpenAIClientTests.chunk("c")
            + OpenAIClientTests.chunk(nil, finish: "length") + "data: [DONE]\n\n"
        let server = try stubServer { _ in .events(stream, splitEvery: 40, delay: 0.02) }
        let chat = session(server)
        await chat.send("Hi").value
        let stats = try XCTUnwrap(chat.lastStats)
        XCTAssertEqual(stats.completionTokens, 3)
        XCTAssertEqual(stats.finishReason, "length")
        XCTAssertNotNil(stats.tokensPerSecond)
        XCTAssertNil(stats.bytesReadPerToken)
    }

    func testResetAndSettingsChange() async throws {
        let server = try stubServer { _ in .events(OpenAIClientTests.helloStream) }
        let chat = session(server)
        await chat.send("Hi").value
        chat.settings.systemPrompt = "New prompt"
        XCTAssertEqual(chat.conversation.systemPrompt, "New prompt")
        chat.reset()
        XCTAssertEqual(chat.conversation.messages.map(\.content), ["New prompt"])
        XCTAssertNil(chat.lastStats)
    }
}
