import Foundation

// MARK: - Settings

/// How the server runs the model's feed-forward layers.
public enum GenerationMode: String, Codable, Sendable, CaseIterable {
    /// All weights in memory.
    case dense
    /// Feed-forward weights read from flash as needed, within a DRAM budget.
    case flash
}

/// Everything the user can set, persisted as one JSON file (snake_case keys).
/// Keys missing from an older file take their default values.
public struct Settings: Codable, Equatable, Sendable {
    /// Root of the OpenAI-compatible server; its port is the one a started server uses.
    public var serverURL: URL
    /// Model name or path, as given to `--model` and sent as `model`.
    public var model: String
    public var temperature: Double
    public var topP: Double
    public var maxTokens: Int
    public var mode: GenerationMode
    /// DRAM budget for flash mode, passed verbatim to `--dram-budget`: bytes with an
    /// optional suffix ("60M", "1.5G") or a fraction of the model ("0.6"); empty means
    /// the server's default.
    public var dramBudget: String
    /// Python that has mlx_flash installed, e.g. `/path/to/mlx-flash/.venv/bin/python`.
    /// A bare name ("python3") is looked up on PATH.
    public var pythonPath: String
    /// Sent first in every request; empty for none.
    public var systemPrompt: String
    /// User and assistant messages kept in the context of a request.
    public var maxTurns: Int

    public static let defaultServerURL = URL(string: "http://127.0.0.1:8080")!
    public static let defaultModel = "smollm2-135m"

    public init(
        serverURL: URL = Settings.defaultServerURL,
        model: String = Settings.defaultModel,
        temperature: Double = 0.7,
        topP: Double = 1.0,
        maxTokens: Int = 512,
        mode: GenerationMode = .dense,
        dramBudget: String = "",
        pythonPath: String = Settings.defaultPythonPath(),
        systemPrompt: String = "",
        maxTurns: Int = 20
    ) {
        self.serverURL = serverURL
        self.model = model
        self.temperature = temperature
        self.topP = topP
        self.maxTokens = maxTokens
        self.mode = mode
        self.dramBudget = dramBudget
        self.pythonPath = pythonPath
        self.systemPrompt = systemPrompt
        self.maxTurns = maxTurns
    }

    enum CodingKeys: String, CodingKey {
        case model, temperature, mode
        case serverURL = "server_url"
        case topP = "top_p"
        case maxTokens = "max_tokens"
        case dramBudget = "dram_budget"
        case pythonPath = "python_path"
        case systemPrompt = "system_prompt"
        case maxTurns = "max_turns"
    }

    public init(from decoder: Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        let d = Settings(pythonPath: "")
        self.serverURL = try c.decodeIfPresent(URL.self, forKey: .serverURL) ?? d.serverURL
        self.model = try c.decodeIfPresent(String.self, forKey: .model) ?? d.model
        self.temperature = try c.decodeIfPresent(Double.self, forKey: .temperature) ?? d.temperature
        self.topP = try c.decodeIfPresent(Double.self, forKey: .topP) ?? d.topP
        self.maxTokens = try c.decodeIfPresent(Int.self, forKey: .maxTokens) ?? d.maxTokens
        self.mode = try c.decodeIfPresent(GenerationMode.self, forKey: .mode) ?? d.mode
        self.dramBudget = try c.decodeIfPresent(String.self, forKey: .dramBudget) ?? d.dramBudget
        self.pythonPath = try c.decodeIfPresent(String.self, forKey: .pythonPath)
            ?? Settings.defaultPythonPath()
        self.systemPrompt = try c.decodeIfPresent(String.self, forKey: .systemPrompt) ?? d.systemPrompt
        self.maxTurns = try c.decodeIfPresent(Int.self, forKey: .maxTurns) ?? d.maxTurns
    }

    // MARK: Derived values

    /// The port of `serverURL` (8080 when it names none).
    public var port: Int { serverURL.port ?? 8080 }

    /// A client for `serverURL`.
    public var client: OpenAIClient { OpenAIClient(baseURL: serverURL) }

    /// How to start a server for these settings.
    public var serverConfiguration: ServerProcess.Configuration {
        ServerProcess.Configuration(
            python: pythonPath, model: model, port: port, mode: mode,
            dramBudget: dramBudget.trimmingCharacters(in: .whitespaces).isEmpty ? nil : dramBudget)
    }

    /// A chat request for `messages` with these sampling settings.
    public func request(messages: [ChatMessage], stream: Bool) -> ChatCompletionRequest {
        ChatCompletionRequest(
            model: model, messages: messages, maxTokens: maxTokens, temperature: temperature,
            topP: topP, stream: stream)
    }

    // MARK: Persistence

    /// Reads settings from `file`; a file that does not exist gives the defaults.
    public static func load(from file: URL) throws -> Settings {
        guard FileManager.default.fileExists(atPath: file.path) else { return Settings() }
        let data = try Data(contentsOf: file)
        do {
            return try JSONDecoder().decode(Settings.self, from: data)
        } catch {
            throw SettingsError.unreadable(path: file.path, reason: "\(error)")
        }
    }

    /// Writes the settings to `file` as JSON, creating its folder if needed.
    public func save(to file: URL) throws {
        try FileManager.default.createDirectory(
            at: file.deletingLastPathComponent(), withIntermediateDirectories: true)
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]
        try encoder.encode(self).write(to: file, options: .atomic)
    }

    /// `<Application Support>/mlx-flash/settings.json` (on Linux, under ~/.local/share).
    public static var defaultFile: URL {
        let base = FileManager.default.urls(for: .applicationSupportDirectory, in: .userDomainMask).first
            ?? FileManager.default.homeDirectoryForCurrentUser
        return base.appendingPathComponent("mlx-flash").appendingPathComponent("settings.json")
    }

    /// The `.venv/bin/python` of the nearest mlx-flash checkout above the current
    /// directory or above this executable (`swift run` puts it in `.build/`);
    /// "python3" when there is none.
    public static func defaultPythonPath() -> String {
        let fm = FileManager.default
        var starts = [URL(fileURLWithPath: fm.currentDirectoryPath)]
        if let executable = Bundle.main.executableURL {
            starts.append(executable.deletingLastPathComponent())
        }
        for start in starts {
            var dir = start.standardizedFileURL
            while true {
                let python = dir.appendingPathComponent(".venv/bin/python")
                if fm.isExecutableFile(atPath: python.path) { return python.path }
                let parent = dir.deletingLastPathComponent()
                if parent.path == dir.path { break }
                dir = parent
            }
        }
        return "python3"
    }
}

/// A settings file that exists but cannot be read.
public enum SettingsError: Error, LocalizedError, Equatable {
    case unreadable(path: String, reason: String)

    public var errorDescription: String? {
        switch self {
        case .unreadable(let path, let reason):
            return "cannot read the settings file \(path): \(reason)"
        }
    }
}
