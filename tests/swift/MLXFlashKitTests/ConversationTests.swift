import XCTest
@testable import MLXFlashKit

final class ConversationTests: XCTestCase {
    private func roles(_ c: Conversation) -> [ChatRole] { c.messages.map(\.role) }
    private func texts(_ c: Conversation) -> [String] { c.messages.map(\.content) }

    func testSystemPrompt() {
        var c = Conversation(systemPrompt: "Be brief.")
        XCTAssertEqual(c.systemPrompt, "Be brief.")
        c.appendUser("Hi")
        c.setSystemPrompt("Be verbose.")
        XCTAssertEqual(texts(c), ["Be verbose.", "Hi"])
        c.setSystemPrompt("  ")
        XCTAssertNil(c.systemPrompt)
        XCTAssertEqual(roles(c), [.user])
        XCTAssertNil(Conversation(systemPrompt: "").systemPrompt)
    }

    func testStreamingDeltasGoToTheLastAssistantMessage() {
        var c = Conversation()
        c.appendUser("Hi")
        c.appendAssistant()
        for piece in ["Hel", "lo", "", " there"] { c.appendDelta(piece) }
        XCTAssertEqual(roles(c), [.user, .assistant])
        XCTAssertEqual(c.messages.last?.content, "Hello there")

        c.appendUser("Again")
        c.appendDelta("New")  // no assistant placeholder: one is started
        XCTAssertEqual(roles(c), [.user, .assistant, .user, .assistant])
        XCTAssertEqual(c.messages.last?.content, "New")
    }

    func testRequestMessagesLeaveOutThePlaceholder() {
        var c = Conversation(systemPrompt: "S")
        c.appendUser("Q")
        c.appendAssistant()
        XCTAssertEqual(c.requestMessages.map(\.role), [.system, .user])
        c.appendDelta("A")
        XCTAssertEqual(c.requestMessages.map(\.role), [.system, .user, .assistant])
    }

    func testDropEmptyAssistantReply() {
        var c = Conversation()
        c.appendUser("Q")
        c.appendAssistant()
        c.dropEmptyAssistantReply()
        XCTAssertEqual(roles(c), [.user])
        c.appendAssistant("kept")
        c.dropEmptyAssistantReply()
        XCTAssertEqual(roles(c), [.user, .assistant])
    }

    func testResetKeepsSystemPrompt() {
        var c = Conversation(systemPrompt: "S")
        c.appendUser("Q")
        c.appendAssistant("A")
        c.reset()
        XCTAssertEqual(texts(c), ["S"])
        XCTAssertTrue(c.turns.isEmpty)
    }

    func testTrimMaxTurns() {
        var c = Conversation(systemPrompt: "S")
        for i in 1...4 {
            c.appendUser("q\(i)")
            c.appendAssistant("a\(i)")
        }
        c.appendUser("q5")
        c.trim(maxTurns: 4)
        XCTAssertEqual(texts(c), ["S", "q4", "a4", "q5"], "history starts with a user turn")
        c.trim(maxTurns: 10)
        XCTAssertEqual(texts(c), ["S", "q4", "a4", "q5"])
        c.trim(maxTurns: 1)
        XCTAssertEqual(texts(c), ["S", "q5"])
    }

    func testTrimMaxCharacters() {
        var c = Conversation(systemPrompt: "SS")  // 2 characters
        c.appendUser("aaaa")
        c.appendAssistant("bbbb")
        c.appendUser("cccc")
        c.trim(maxCharacters: 100)
        XCTAssertEqual(c.turns.count, 3)
        c.trim(maxCharacters: 10)  // 2 + 4 + 4 fits; the assistant turn cannot lead
        XCTAssertEqual(texts(c), ["SS", "cccc"])
        c.trim(maxCharacters: 1)
        XCTAssertEqual(texts(c), ["SS", "cccc"], "the last turn always stays")
    }
}
