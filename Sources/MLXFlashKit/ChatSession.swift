import Foundation

// MARK: - Generation statistics

/// Figures for the last reply: the server's `flash` statistics where it sent them,
/// otherwise what the client measured.
public struct GenerationStats: Equatable, Sendable {
    public var tokensPerSecond: Double?
    public var msPerToken: Double?
    /// Bytes read from flash per token (absent or 0 in dense mode).
    public var bytesReadPerToken: Double?
    /// The server's mode, when it said.
    public var mode: String?
    public var promptTokens: Int?
    /// From `usage` when sent, otherwise the number of non-empty deltas.
    public var completionTokens: Int
    /// "stop", "length", or "cancelled" when the user stopped the reply.
    public var finishReason: String?

    public init(
        tokensPerSecond: Double? = nil, msPerToken: Double? = nil,
        bytesReadPerToken: Double? = nil, mode: String? = nil, promptTokens: Int? = nil,
        completionTokens: Int = 0, finishReason: String? = nil
    ) {
        self.tokensPerSecond = tokensPerSecond
        self.msPerToken = msPerToken
        self.bytesReadPerToken = bytesReadPerToken
        self.mode = mode
        self.promptTokens = promptTokens
        self.completionTokens = completionTokens
        self.finishReason = finishReason
    }

    /// One line for a status label, e.g. "23.4 tok/s · 42.6 ms/token · 12.3 MB read/token".
    public var summary: String {
        var parts: [String] = []
        if let tps = tokensPerSecond { parts.append(String(format: "%.1f tok/s", tps)) }
        if let ms = msPerToken { parts.append(String(format: "%.1f ms/token", ms)) }
        if let bytes = bytesReadPerToken, bytes > 0 {
            parts.append("\(GenerationStats.formatBytes(bytes)) read/token")
        }
        if parts.isEmpty { parts.append("\(completionTokens) tokens") }
        return parts.joined(separator: " · ")
    }

    /// Decimal units, as drives and bandwidth figures use them: "512 B", "12.3 MB".
    public static func formatBytes(_ bytes: Double) -> String {
        let units = ["B", "KB", "MB", "GB", "TB"]
        var value = bytes
        var unit = 0
        while value >= 1000, unit < units.count - 1 {
            value /= 1000
            unit += 1
        }
        return unit == 0 ? "\(Int(value)) B" : String(format: "%.1f %@", value, units[unit])
    }
}

// MARK: - Chat session

/// Ties settings, client and conversation together: `send` streams a reply into the
/// conversation, `stop` cancels it (and with it the HTTP request).
///
/// No UI in here: a view model sets `onChange` and re-renders.
@MainActor
public final class ChatSession {
    /// Changing the settings applies from the next request on.
    public var settings: Settings {
        didSet {
            conversation.setSystemPrompt(settings.systemPrompt)
            changed()
        }
    }
    public private(set) var conversation: Conversation
    public private(set) var isGenerating = false
    public private(set) var lastStats: GenerationStats?
    /// The last failure as one sentence; cleared by the next `send`.
    public private(set) var lastError: String?
    /// Called on the main actor after every change (each streamed delta included).
    public var onChange: (@MainActor () -> Void)?

    private var task: Task<Void, Never>?

    public init(settings: Settings = Settings()) {
        self.settings = settings
        self.conversation = Conversation(systemPrompt: settings.systemPrompt)
    }

    /// Appends `text` as a user message and streams the reply into the conversation.
    /// Returns the generation task (await its `value` to wait for the reply); ignored
    /// while a reply is still streaming or when `text` is blank.
    @discardableResult
    public func send(_ text: String) -> Task<Void, Never> {
        let text = text.trimmingCharacters(in: .whitespacesAndNewlines)
        guard !isGenerating, !text.isEmpty else { return Task {} }
        conversation.appendUser(text)
        conversation.trim(maxTurns: max(settings.maxTurns, 1))
        let request = settings.request(messages: conversation.requestMessages, stream: true)
        conversation.appendAssistant()
        isGenerating = true
        lastError = nil
        changed()

        let client = settings.client
        let task = Task { [weak self] in
            guard let self else { return }
            await self.stream(client.streamChat(request))
        }
        self.task = task
        return task
    }

    /// Cancels the reply being streamed; the text received so far stays.
    public func stop() {
        task?.cancel()
    }

    /// Clears the conversation (the system prompt stays). Stops a streaming reply first.
    public func reset() {
        stop()
        conversation.reset()
        lastStats = nil
        lastError = nil
        changed()
    }

    // MARK: Private

    private func stream(_ deltas: AsyncThrowingStream<ChatDelta, Error>) async {
        var stats = GenerationStats()
        var firstTokenAt: Date?
        var lastTokenAt: Date?
        do {
            for try await delta in deltas {
                if !delta.content.isEmpty {
                    conversation.appendDelta(delta.content)
                    stats.completionTokens += 1
                    let now = Date()
                    if firstTokenAt == nil { firstTokenAt = now }
                    lastTokenAt = now
                }
                if let reason = delta.finishReason { stats.finishReason = reason }
                if let usage = delta.usage {
                    stats.promptTokens = usage.promptTokens
                    stats.completionTokens = usage.completionTokens
                }
                if let flash = delta.flash {
                    stats.tokensPerSecond = flash.tokensPerSecond ?? stats.tokensPerSecond
                    stats.msPerToken = flash.msPerToken ?? stats.msPerToken
                    stats.bytesReadPerToken = flash.bytesReadPerToken ?? stats.bytesReadPerToken
                    stats.mode = flash.mode ?? stats.mode
                    lastStats = stats
                }
                changed()
            }
            // Cancelling the task ends the stream without an error.
            if Task.isCancelled { stats.finishReason = "cancelled" }
        } catch is CancellationError {
            stats.finishReason = "cancelled"
        } catch {
            lastError = (error as? LocalizedError)?.errorDescription ?? "\(error)"
        }
        // Without server figures, measure between the first and the last token.
        if stats.tokensPerSecond == nil, let first = firstTokenAt, let last = lastTokenAt,
           stats.completionTokens > 1, last > first {
            let seconds = last.timeIntervalSince(first)
            stats.tokensPerSecond = Double(stats.completionTokens - 1) / seconds
            stats.msPerToken = 1000 * seconds / Double(stats.completionTokens - 1)
        }
        conversation.dropEmptyAssistantReply()
        lastStats = stats
        isGenerating = false
        task = nil
        changed()
    }

    private func changed() {
        onChange?()
    }
}
