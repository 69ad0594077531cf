import Foundation

// The wire format of the OpenAI-compatible endpoints that `mlx_flash.server` serves.
// Field names follow the OpenAI API (snake_case in JSON); the optional `flash` object is
// mlx-flash's own addition and carries the decode statistics.

// MARK: - Messages

/// Who wrote a chat message.
public enum ChatRole: String, Codable, Sendable, CaseIterable {
    case system
    case user
    case assistant
}

/// One message of a conversation, as sent to and received from the server.
public struct ChatMessage: Codable, Equatable, Identifiable, Sendable {
    /// Local identity for lists in the UI; not part of the JSON.
    public var id: UUID
    public var role: ChatRole
    public var content: String

    public init(role: ChatRole, content: String, id: UUID = UUID()) {
        self.id = id
        self.role = role
        self.content = content
    }

    enum CodingKeys: String, CodingKey {
        case role, content
    }

    public init(from decoder: Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        self.id = UUID()
        self.role = try c.decode(ChatRole.self, forKey: .role)
        // `content` may be null in OpenAI responses (e.g. an empty reply).
        self.content = try c.decodeIfPresent(String.self, forKey: .content) ?? ""
    }

    public func encode(to encoder: Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encode(role, forKey: .role)
        try c.encode(content, forKey: .content)
    }

    /// Equality of role and content; the local `id` is ignored.
    public static func == (a: ChatMessage, b: ChatMessage) -> Bool {
        a.role == b.role && a.content == b.content
    }
}

// MARK: - Requests

/// Body of `POST /v1/chat/completions`. Optional fields left `nil` are not sent, so the
/// server's defaults apply.
public struct ChatCompletionRequest: Codable, Equatable, Sendable {
    public var model: String
    public var messages: [ChatMessage]
    public var maxTokens: Int?
    public var temperature: Double?
    public var topP: Double?
    public var seed: Int?
    public var stop: [String]?
    public var stream: Bool?

    public init(
        model: String, messages: [ChatMessage], maxTokens: Int? = nil,
        temperature: Double? = nil, topP: Double? = nil, seed: Int? = nil,
        stop: [String]? = nil, stream: Bool? = nil
    ) {
        self.model = model
        self.messages = messages
        self.maxTokens = maxTokens
        self.temperature = temperature
        self.topP = topP
        self.seed = seed
        self.stop = stop
        self.stream = stream
    }

    enum CodingKeys: String, CodingKey {
        case model, messages, temperature, seed, stop, stream
        case maxTokens = "max_tokens"
        case topP = "top_p"
    }
}

// MARK: - Responses

/// Token counts of one completion.
public struct Usage: Codable, Equatable, Sendable {
    public var promptTokens: Int
    public var completionTokens: Int
    public var totalTokens: Int

    public init(promptTokens: Int, completionTokens: Int, totalTokens: Int) {
        self.promptTokens = promptTokens
        self.completionTokens = completionTokens
        self.totalTokens = totalTokens
    }

    enum CodingKeys: String, CodingKey {
        case promptTokens = "prompt_tokens"
        case completionTokens = "completion_tokens"
        case totalTokens = "total_tokens"
    }
}

/// mlx-flash's decode statistics, sent as the extra `"flash"` field of a response or
/// chunk. Every field is optional so that older or newer servers still decode.
public struct FlashStats: Codable, Equatable, Sendable {
    public var tokensPerSecond: Double?
    public var msPerToken: Double?
    /// Bytes read from flash (SSD) per generated token; 0 or absent in dense mode.
    public var bytesReadPerToken: Double?
    /// "dense" or "flash" (or another mode the server reports).
    public var mode: String?
    public var promptTokensPerSecond: Double?
    public var peakMemoryGB: Double?

    public init(
        tokensPerSecond: Double? = nil, msPerToken: Double? = nil,
        bytesReadPerToken: Double? = nil, mode: String? = nil,
        promptTokensPerSecond: Double? = nil, peakMemoryGB: Double? = nil
    ) {
        self.tokensPerSecond = tokensPerSecond
        self.msPerToken = msPerToken
        self.bytesReadPerToken = bytesReadPerToken
        self.mode = mode
        self.promptTokensPerSecond = promptTokensPerSecond
        self.peakMemoryGB = peakMemoryGB
    }

    enum CodingKeys: String, CodingKey {
        case tokensPerSecond = "tokens_per_second"
        case msPerToken = "ms_per_token"
        case bytesReadPerToken = "bytes_read_per_token"
        case mode
        case promptTokensPerSecond = "prompt_tokens_per_second"
        case peakMemoryGB = "peak_memory_gb"
    }
}

/// Response of a non-streaming `POST /v1/chat/completions`.
public struct ChatCompletionResponse: Codable, Equatable, Sendable {
    public struct Choice: Codable, Equatable, Sendable {
        public var index: Int
        public var message: ChatMessage
        public var finishReason: String?

        public init(index: Int = 0, message: ChatMessage, finishReason: String?) {
            self.index = index
            self.message = message
            self.finishReason = finishReason
        }

        enum CodingKeys: String, CodingKey {
            case index, message
            case finishReason = "finish_reason"
        }

        public init(from decoder: Decoder) throws {
            let c = try decoder.container(keyedBy: CodingKeys.self)
            self.index = try c.decodeIfPresent(Int.self, forKey: .index) ?? 0
            self.message = try c.decode(ChatMessage.self, forKey: .message)
            self.finishReason = try c.decodeIfPresent(String.self, forKey: .finishReason)
        }
    }

    public var id: String?
    public var object: String?
    public var created: Int?
    public var model: String?
    public var choices: [Choice]
    public var usage: Usage?
    public var flash: FlashStats?

    public init(
        id: String? = nil, object: String? = "chat.completion", created: Int? = nil,
        model: String? = nil, choices: [Choice], usage: Usage? = nil, flash: FlashStats? = nil
    ) {
        self.id = id
        self.object = object
        self.created = created
        self.model = model
        self.choices = choices
        self.usage = usage
        self.flash = flash
    }

    /// The text of the first choice.
    public var content: String { choices.first?.message.content ?? "" }
}

/// One `data:` chunk of a streaming `POST /v1/chat/completions`.
public struct ChatCompletionChunk: Codable, Equatable, Sendable {
    public struct Delta: Codable, Equatable, Sendable {
        public var role: ChatRole?
        public var content: String?

        public init(role: ChatRole? = nil, content: String? = nil) {
            self.role = role
            self.content = content
        }
    }

    public struct Choice: Codable, Equatable, Sendable {
        public var index: Int
        public var delta: Delta
        public var finishReason: String?

        public init(index: Int = 0, delta: Delta, finishReason: String? = nil) {
            self.index = index
            self.delta = delta
            self.finishReason = finishReason
        }

        enum CodingKeys: String, CodingKey {
            case index, delta
            case finishReason = "finish_reason"
        }

        public init(from decoder: Decoder) throws {
            let c = try decoder.container(keyedBy: CodingKeys.self)
            self.index = try c.decodeIfPresent(Int.self, forKey: .index) ?? 0
            self.delta = try c.decodeIfPresent(Delta.self, forKey: .delta) ?? Delta()
            self.finishReason = try c.decodeIfPresent(String.self, forKey: .finishReason)
        }
    }

    public var id: String?
    public var object: String?
    public var created: Int?
    public var model: String?
    public var choices: [Choice]
    public var usage: Usage?
    public var flash: FlashStats?

    public init(
        id: String? = nil, object: String? = "chat.completion.chunk", created: Int? = nil,
        model: String? = nil, choices: [Choice], usage: Usage? = nil, flash: FlashStats? = nil
    ) {
        self.id = id
        self.object = object
        self.created = created
        self.model = model
        self.choices = choices
        self.usage = usage
        self.flash = flash
    }

    enum CodingKeys: String, CodingKey {
        case id, object, created, model, choices, usage, flash
    }

    public init(from decoder: Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        self.id = try c.decodeIfPresent(String.self, forKey: .id)
        self.object = try c.decodeIfPresent(String.self, forKey: .object)
        self.created = try c.decodeIfPresent(Int.self, forKey: .created)
        self.model = try c.decodeIfPresent(String.self, forKey: .model)
        // A final usage-only chunk may have an empty or missing `choices`.
        self.choices = try c.decodeIfPresent([Choice].self, forKey: .choices) ?? []
        self.usage = try c.decodeIfPresent(Usage.self, forKey: .usage)
        self.flash = try c.decodeIfPresent(FlashStats.self, forKey: .flash)
    }
}

/// What a chat stream yields: the first choice of one chunk, flattened.
public struct ChatDelta: Equatable, Sendable {
    /// Text to append to the assistant message (may be empty).
    public var content: String
    /// Set on the last chunk: "stop", "length", ...
    public var finishReason: String?
    public var usage: Usage?
    public var flash: FlashStats?

    public init(
        content: String, finishReason: String? = nil, usage: Usage? = nil,
        flash: FlashStats? = nil
    ) {
        self.content = content
        self.finishReason = finishReason
        self.usage = usage
        self.flash = flash
    }

    public init(chunk: ChatCompletionChunk) {
        let choice = chunk.choices.first
        self.init(
            content: choice?.delta.content ?? "", finishReason: choice?.finishReason,
            usage: chunk.usage, flash: chunk.flash)
    }
}

// MARK: - Models

/// One entry of `GET /v1/models`.
public struct ModelInfo: Codable, Equatable, Sendable {
    public var id: String
    public var object: String?
    public var created: Int?
    public var ownedBy: String?

    public init(id: String, object: String? = "model", created: Int? = nil, ownedBy: String? = nil) {
        self.id = id
        self.object = object
        self.created = created
        self.ownedBy = ownedBy
    }

    enum CodingKeys: String, CodingKey {
        case id, object, created
        case ownedBy = "owned_by"
    }
}

/// Response of `GET /v1/models`.
public struct ModelList: Codable, Equatable, Sendable {
    public var object: String?
    public var data: [ModelInfo]

    public init(object: String? = "list", data: [ModelInfo]) {
        self.object = object
        self.data = data
    }
}

// MARK: - Errors

/// The `"error"` object of an OpenAI-style error body.
public struct APIErrorDetail: Codable, Equatable, Sendable {
    public var message: String
    public var type: String?
    /// OpenAI sends a string, some servers a number; both are kept as text.
    public var code: String?
    public var param: String?

    public init(message: String, type: String? = nil, code: String? = nil, param: String? = nil) {
        self.message = message
        self.type = type
        self.code = code
        self.param = param
    }

    enum CodingKeys: String, CodingKey {
        case message, type, code, param
    }

    public init(from decoder: Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        self.message = try c.decodeIfPresent(String.self, forKey: .message) ?? "unknown error"
        self.type = try c.decodeIfPresent(String.self, forKey: .type)
        self.param = try? c.decodeIfPresent(String.self, forKey: .param)
        if let text = try? c.decodeIfPresent(String.self, forKey: .code) {
            self.code = text
        } else if let number = try? c.decodeIfPresent(Int.self, forKey: .code) {
            self.code = String(number)
        } else {
            self.code = nil
        }
    }
}

/// An OpenAI-style error body: `{"error": {"message": ..., "type": ..., "code": ...}}`.
public struct APIErrorBody: Codable, Equatable, Sendable {
    public var error: APIErrorDetail

    public init(error: APIErrorDetail) {
        self.error = error
    }
}
