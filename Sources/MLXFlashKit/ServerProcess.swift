import Foundation
#if canImport(Darwin)
import Darwin
#elseif canImport(Glibc)
import Glibc
#endif

// MARK: - Server process

/// Runs `python -m mlx_flash.server` as a child process: start, wait until it answers
/// `GET /v1/models`, stop.
///
/// Main-actor bound so a UI can observe `state` directly; all waiting is asynchronous.
@MainActor
public final class ServerProcess {
    /// Where the server is in its life.
    public enum State: Equatable, Sendable {
        case stopped
        case starting
        case running
        /// Could not start, did not answer in time, or exited on its own.
        case failed(String)
    }

    /// How to start the server.
    public struct Configuration: Equatable, Sendable {
        /// Python executable with mlx_flash installed; a bare name is looked up on PATH.
        public var python: String
        public var model: String
        public var port: Int
        public var mode: GenerationMode
        /// Passed to `--dram-budget` in flash mode.
        public var dramBudget: String?
        /// Appended after the standard arguments.
        public var extraArguments: [String]
        /// Host the readiness check connects to.
        public var host: String
        /// Seconds to wait for the first answer (loading a big model takes a while).
        public var startupTimeout: TimeInterval
        /// The server's stdout and stderr go here.
        public var logFile: URL
        public var workingDirectory: URL?

        public init(
            python: String, model: String, port: Int, mode: GenerationMode = .dense,
            dramBudget: String? = nil, extraArguments: [String] = [], host: String = "127.0.0.1",
            startupTimeout: TimeInterval = 300,
            logFile: URL = FileManager.default.temporaryDirectory
                .appendingPathComponent("mlx-flash-server.log"),
            workingDirectory: URL? = nil
        ) {
            self.python = python
            self.model = model
            self.port = port
            self.mode = mode
            self.dramBudget = dramBudget
            self.extraArguments = extraArguments
            self.host = host
            self.startupTimeout = startupTimeout
            self.logFile = logFile
            self.workingDirectory = workingDirectory
        }

        /// The arguments after the Python executable:
        /// `-m mlx_flash.server --model M --port P [--mode flash [--dram-budget B]]`.
        public var arguments: [String] {
            var args = ["-m", "mlx_flash.server", "--model", model, "--port", String(port)]
            if mode == .flash {
                args += ["--mode", "flash"]
                if let dramBudget, !dramBudget.isEmpty { args += ["--dram-budget", dramBudget] }
            }
            return args + extraArguments
        }

        /// The URL the server answers on.
        public var baseURL: URL { URL(string: "http://\(host):\(port)")! }
    }

    /// The current state; `onStateChange` hears every change.
    public private(set) var state: State = .stopped {
        didSet { if state != oldValue { onStateChange?(state) } }
    }

    /// Called on the main actor after each change of `state`.
    public var onStateChange: (@MainActor (State) -> Void)?

    /// The configuration of the last start.
    public private(set) var configuration: Configuration?

    /// Seconds between readiness checks.
    public var pollInterval: TimeInterval = 0.25

    private var process: Process?
    private var generation = 0  // tells a stale exit notification from the current one
    private var stopping = false

    public init() {}

    /// The process id while the server runs.
    public var processIdentifier: Int32? {
        guard let process, process.isRunning else { return nil }
        return process.processIdentifier
    }

    // MARK: Start and stop

    /// Starts the server and returns once it answers `GET /v1/models`. Throws
    /// `ServerProcessError` (and leaves `state` at `.failed`) when it cannot start, exits,
    /// or does not answer within `configuration.startupTimeout`. Cancelling the calling
    /// task stops the server.
    public func start(_ configuration: Configuration) async throws {
        switch state {
        case .starting, .running: throw ServerProcessError.alreadyRunning
        case .stopped, .failed: break
        }
        self.configuration = configuration
        state = .starting
        do {
            try await launchAndWait(configuration)
            state = .running
        } catch is CancellationError {
            await stop()
            throw CancellationError()
        } catch {
            await terminateProcess()
            state = .failed(error.localizedDescription)
            throw error
        }
    }

    /// Stops the server: SIGTERM, then SIGKILL if it has not exited after `grace` seconds.
    public func stop(grace: TimeInterval = 10) async {
        await terminateProcess(grace: grace)
        state = .stopped
    }

    /// Sends SIGTERM without waiting, for when the app itself is quitting.
    public func signalStop() {
        guard let process, process.isRunning else { return }
        stopping = true
        process.terminate()
    }

    /// The last `maxBytes` of the server's log.
    public func logTail(maxBytes: Int = 4096) -> String {
        guard let file = configuration?.logFile,
              let handle = try? FileHandle(forReadingFrom: file)
        else { return "" }
        defer { try? handle.close() }
        let size = handle.seekToEndOfFile()
        handle.seek(toFileOffset: size > UInt64(maxBytes) ? size - UInt64(maxBytes) : 0)
        return String(decoding: handle.readDataToEndOfFile(), as: UTF8.self)
    }

    // MARK: Private

    private func launchAndWait(_ configuration: Configuration) async throws {
        let client = OpenAIClient(baseURL: configuration.baseURL, timeout: 2)
        if (try? await client.models()) != nil {
            throw ServerProcessError.portInUse(configuration.port)
        }

        let process = Process()
        if configuration.python.contains("/") {
            let python = URL(fileURLWithPath: configuration.python)
            guard FileManager.default.isExecutableFile(atPath: python.path) else {
                throw ServerProcessError.pythonNotFound(configuration.python)
            }
            process.executableURL = python
            process.arguments = configuration.arguments
        } else {
            process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
            process.arguments = [configuration.python] + configuration.arguments
        }
        var environment = ProcessInfo.processInfo.environment
        environment["PYTHONUNBUFFERED"] = "1"
        process.environment = environment
        if let dir = configuration.workingDirectory { process.currentDirectoryURL = dir }

        let log = try openLog(configuration.logFile)
        defer { try? log.close() }  // the child keeps its own descriptor
        process.standardOutput = log
        process.standardError = log
        process.standardInput = FileHandle.nullDevice

        generation += 1
        let generation = self.generation
        process.terminationHandler = { [weak self] finished in
            let status = finished.terminationStatus
            Task { @MainActor in self?.processDidExit(generation: generation, status: status) }
        }
        stopping = false
        do {
            try process.run()
        } catch {
            throw ServerProcessError.launchFailed("\(configuration.python): \(error.localizedDescription)")
        }
        self.process = process

        let deadline = Date().addingTimeInterval(configuration.startupTimeout)
        while true {
            try Task.checkCancellation()
            if !process.isRunning {
                throw ServerProcessError.exited(
                    status: process.terminationStatus, lastLine: lastLogLine())
            }
            if (try? await client.models()) != nil { return }
            if Date() > deadline {
                throw ServerProcessError.timedOut(seconds: configuration.startupTimeout)
            }
            try await Task.sleep(nanoseconds: UInt64(pollInterval * 1_000_000_000))
        }
    }

    private func openLog(_ file: URL) throws -> FileHandle {
        do {
            try FileManager.default.createDirectory(
                at: file.deletingLastPathComponent(), withIntermediateDirectories: true)
            guard FileManager.default.createFile(atPath: file.path, contents: nil) else {  // truncates
                throw CocoaError(.fileWriteUnknown)
            }
            return try FileHandle(forWritingTo: file)
        } catch {
            throw ServerProcessError.launchFailed("cannot write the log \(file.path): \(error.localizedDescription)")
        }
    }

    /// Terminates the current process, if any, and waits for it to exit.
    private func terminateProcess(grace: TimeInterval = 10) async {
        guard let process else { return }
        stopping = true
        if process.isRunning {
            process.terminate()
            if !(await waitForExit(process, seconds: grace)) {
                kill(process.processIdentifier, SIGKILL)
                _ = await waitForExit(process, seconds: 5)
            }
        }
        self.process = nil
    }

    private func waitForExit(_ process: Process, seconds: TimeInterval) async -> Bool {
        let deadline = Date().addingTimeInterval(seconds)
        while process.isRunning {
            if Date() > deadline { return false }
            try? await Task.sleep(nanoseconds: 20_000_000)
        }
        return true
    }

    private func processDidExit(generation: Int, status: Int32) {
        guard generation == self.generation, !stopping, state == .running else { return }
        process = nil
        state = .failed(ServerProcessError.exited(status: status, lastLine: lastLogLine())
            .localizedDescription)
    }

    private func lastLogLine() -> String? {
        logTail().split(whereSeparator: \.isNewline)
            .map { $0.trimmingCharacters(in: .whitespaces) }
            .last { !$0.isEmpty }
    }
}

/// Why the server did not start or stopped on its own.
public enum ServerProcessError: Error, LocalizedError, Equatable {
    case alreadyRunning
    case portInUse(Int)
    case pythonNotFound(String)
    case launchFailed(String)
    case exited(status: Int32, lastLine: String?)
    case timedOut(seconds: TimeInterval)

    public var errorDescription: String? {
        switch self {
        case .alreadyRunning:
            return "the server is already running"
        case .portInUse(let port):
            return "another server already answers on port \(port); stop it or choose another port"
        case .pythonNotFound(let path):
            return "no Python executable at \(path); run `make demo` to create .venv or set the Python path"
        case .launchFailed(let reason):
            return "cannot start the server: \(reason)"
        case .exited(let status, let lastLine):
            let detail = lastLine.map { ": \($0)" } ?? ""
            return "the server exited with status \(status)\(detail)"
        case .timedOut(let seconds):
            return "the server did not answer within \(Int(seconds)) seconds"
        }
    }
}
