import Foundation

// MARK: - Conversation

/// The messages of one chat: an optional system prompt, then user and assistant turns.
///
/// A value type with no I/O: the chat session appends to it while a reply streams in,
/// the UI renders it, the tests drive it directly.
public struct Conversation: Equatable, Sendable {
    /// All messages in order; the system prompt, when set, is the first one.
    public private(set) var messages: [ChatMessage] = []

    public init(systemPrompt: String? = nil) {
        setSystemPrompt(systemPrompt)
    }

    /// The system prompt, if the conversation has one.
    public var systemPrompt: String? {
        messages.first?.role == .system ? messages.first?.content : nil
    }

    /// The user and assistant turns, without the system prompt.
    public var turns: [ChatMessage] {
        messages.filter { $0.role != .system }
    }

    /// Sets, replaces or (with `nil` or blank text) removes the system prompt.
    public mutating func setSystemPrompt(_ text: String?) {
        if messages.first?.role == .system { messages.removeFirst() }
        if let text, !text.trimmingCharacters(in: .whitespacesAndNewlines).isEmpty {
            messages.insert(ChatMessage(role: .system, content: text), at: 0)
        }
    }

    /// Appends a user message.
    public mutating func appendUser(_ text: String) {
        messages.append(ChatMessage(role: .user, content: text))
    }

    /// Appends an assistant message (empty by default, to stream into).
    public mutating func appendAssistant(_ text: String = "") {
        messages.append(ChatMessage(role: .assistant, content: text))
    }

    /// Appends streamed text to the last message if it is the assistant's, otherwise
    /// starts a new assistant message with it.
    public mutating func appendDelta(_ text: String) {
        if let last = messages.indices.last, messages[last].role == .assistant {
            messages[last].content += text
        } else {
            appendAssistant(text)
        }
    }

    /// Removes the last message if it is an assistant message with no text (a reply
    /// that was stopped or failed before its first token).
    public mutating func dropEmptyAssistantReply() {
        if let last = messages.last, last.role == .assistant, last.content.isEmpty {
            messages.removeLast()
        }
    }

    /// Removes every turn; the system prompt stays.
    public mutating func reset() {
        messages.removeAll { $0.role != .system }
    }

    // MARK: Trimming

    /// Keeps the system prompt and at most the last `maxTurns` turns. The kept history
    /// starts with a user message whenever one is left to start it.
    public mutating func trim(maxTurns: Int) {
        var turns = self.turns
        guard turns.count > maxTurns else { return }
        turns.removeFirst(turns.count - max(maxTurns, 0))
        dropLeadingAssistants(&turns)
        replaceTurns(with: turns)
    }

    /// Drops the oldest turns until the text of all messages fits in `maxCharacters`
    /// (a rough stand-in for a token budget). The last turn is always kept.
    public mutating func trim(maxCharacters: Int) {
        var turns = self.turns
        let fixed = systemPrompt?.count ?? 0
        var total = fixed + turns.reduce(0) { $0 + $1.content.count }
        while total > maxCharacters, turns.count > 1 {
            total -= turns.removeFirst().content.count
        }
        dropLeadingAssistants(&turns)
        replaceTurns(with: turns)
    }

    /// The messages to send for the next reply: everything except a trailing empty
    /// assistant message (the placeholder the reply streams into).
    public var requestMessages: [ChatMessage] {
        var out = messages
        if let last = out.last, last.role == .assistant, last.content.isEmpty {
            out.removeLast()
        }
        return out
    }

    private func dropLeadingAssistants(_ turns: inout [ChatMessage]) {
        while turns.count > 1, turns.first?.role == .assistant {
            turns.removeFirst()
        }
    }

    private mutating func replaceTurns(with turns: [ChatMessage]) {
        messages.removeAll { $0.role != .system }
        messages.append(contentsOf: turns)
    }
}
