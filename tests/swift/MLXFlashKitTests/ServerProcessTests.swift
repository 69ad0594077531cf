import XCTest
@testable import MLXFlashKit

/// `ServerProcess` with stand-in "python" scripts, so the life cycle is tested without
/// the real server (LiveServerTests covers that).
@MainActor
final class ServerProcessTests: XCTestCase {
    /// A temporary executable shell script with `body`; it ignores its arguments.
    private func script(_ body: String) throws -> String {
        let dir = FileManager.default.temporaryDirectory
            .appendingPathComponent("mlx-flash-server-test-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        let file = dir.appendingPathComponent("python")
        try Data("#!/bin/sh\n\(body)\n".utf8).write(to: file)
        try FileManager.default.setAttributes([.posixPermissions: 0o755], ofItemAtPath: file.path)
        addTeardownBlock { try? FileManager.default.removeItem(at: dir) }
        return file.path
    }

    private func configuration(python: String, port: Int, timeout: TimeInterval = 10) -> ServerProcess.Configuration {
        ServerProcess.Configuration(
            python: python, model: "stub", port: port, startupTimeout: timeout,
            logFile: FileManager.default.temporaryDirectory
                .appendingPathComponent("mlx-flash-test-\(UUID().uuidString).log"))
    }

    private func isAlive(_ pid: Int32) -> Bool {
        kill(pid, 0) == 0
    }

    func testMissingPython() async throws {
        let server = ServerProcess()
        do {
            try await server.start(configuration(python: "/nonexistent/bin/python", port: try Socket.freePort()))
            XCTFail("expected an error")
        } catch let error as ServerProcessError {
            XCTAssertEqual(error, .pythonNotFound("/nonexistent/bin/python"))
        }
        guard case .failed(let message) = server.state else { return XCTFail("state \(server.state)") }
        XCTAssertTrue(message.contains("make demo"), message)
    }

    func testProcessThatExitsReportsItsLastLogLine() async throws {
        let python = try script("echo 'loading...'\necho 'error: unknown model stub' >&2\nexit 2")
        let server = ServerProcess()
        var states: [ServerProcess.State] = []
        server.onStateChange = { states.append($0) }
        do {
            try await server.start(configuration(python: python, port: try Socket.freePort()))
            XCTFail("expected an error")
        } catch let error as ServerProcessError {
            XCTAssertEqual(error, .exited(status: 2, lastLine: "error: unknown model stub"))
        }
        XCTAssertEqual(states, [.starting, .failed("the server exited with status 2: error: unknown model stub")])
        XCTAssertTrue(server.logTail().contains("loading..."))
    }

    func testArgumentsReachThePython() async throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("args-\(UUID().uuidString).txt")
        defer { try? FileManager.default.removeItem(at: dir) }
        let python = try script("echo \"$@\" > '\(dir.path)'\nexit 1")
        var config = configuration(python: python, port: 4321)
        config.mode = .flash
        config.dramBudget = "1.5G"
        do { try await ServerProcess().start(config) } catch {}
        let args = try String(contentsOf: dir, encoding: .utf8).trimmingCharacters(in: .whitespacesAndNewlines)
        XCTAssertEqual(args, "-m mlx_flash.server --model stub --port 4321 --mode flash --dram-budget 1.5G")
    }

    func testStartWaitsUntilTheServerAnswersThenStops() async throws {
        let port = try Socket.freePort()
        let python = try script("exec sleep 60")
        let server = ServerProcess()
        server.pollInterval = 0.05
        // The stand-in answers only after a while, as a loading model would.
        let stub = Task.detached { () -> StubHTTPServer? in
            try? await Task.sleep(nanoseconds: 500_000_000)
            return try? StubHTTPServer(port: port) { _ in .json(OpenAIClientTests.modelsJSON) }
        }
        let started = Date()
        try await server.start(configuration(python: python, port: port))
        XCTAssertGreaterThan(Date().timeIntervalSince(started), 0.4)
        XCTAssertEqual(server.state, .running)
        let pid = try XCTUnwrap(server.processIdentifier)
        XCTAssertTrue(isAlive(pid))

        await server.stop()
        XCTAssertEqual(server.state, .stopped)
        XCTAssertNil(server.processIdentifier)
        XCTAssertFalse(isAlive(pid))
        await stub.value?.stop()
    }

    func testPortAlreadyServed() async throws {
        let stub = try stubServer { _ in .json(OpenAIClientTests.modelsJSON) }
        let server = ServerProcess()
        do {
            try await server.start(configuration(python: try script("exec sleep 60"), port: stub.port))
            XCTFail("expected an error")
        } catch let error as ServerProcessError {
            XCTAssertEqual(error, .portInUse(stub.port))
        }
    }

    func testTimeoutKillsTheProcess() async throws {
        let pidFile = FileManager.default.temporaryDirectory.appendingPathComponent("pid-\(UUID().uuidString)")
        defer { try? FileManager.default.removeItem(at: pidFile) }
        let python = try script("echo $$ > '\(pidFile.path)'\nexec sleep 60")
        let server = ServerProcess()
        do {
            try await server.start(configuration(python: python, port: try Socket.freePort(), timeout: 1))
            XCTFail("expected an error")
        } catch let error as ServerProcessError {
            XCTAssertEqual(error, .timedOut(seconds: 1))
        }
        XCTAssertEqual(server.state, .failed("the server did not answer within 1 seconds"))
        let pid = try XCTUnwrap(Int32(String(contentsOf: pidFile, encoding: .utf8).trimmingCharacters(in: .whitespacesAndNewlines)))
        XCTAssertFalse(isAlive(pid))
    }

    func testUnexpectedExitAfterStartIsAFailure() async throws {
        let port = try Socket.freePort()
        let python = try script("sleep 1.5\necho 'Killed: out of memory' >&2\nexit 137")
        let server = ServerProcess()
        server.pollInterval = 0.05
        let stub = Task.detached { () -> StubHTTPServer? in
            try? await Task.sleep(nanoseconds: 300_000_000)
            return try? StubHTTPServer(port: port) { _ in .json(OpenAIClientTests.modelsJSON) }
        }
        try await server.start(configuration(python: python, port: port))
        XCTAssertEqual(server.state, .running)
        let deadline = Date().addingTimeInterval(5)
        while server.state == .running, Date() < deadline {
            try await Task.sleep(nanoseconds: 50_000_000)
        }
        XCTAssertEqual(server.state, .failed("the server exited with status 137: Killed: out of memory"))
        await stub.value?.stop()
    }

    func testStartTwiceIsRefused() async throws {
        let port = try Socket.freePort()
        let server = ServerProcess()
        server.pollInterval = 0.05
        let first = Task { try await server.start(self.configuration(python: try self.script("exec sleep 60"), port: port, timeout: 2)) }
        while server.state != .starting { await Task.yield() }
        do {
            try await server.start(configuration(python: "/bin/false", port: port))
            XCTFail("expected an error")
        } catch let error as ServerProcessError {
            XCTAssertEqual(error, .alreadyRunning)
        }
        first.cancel()
        _ = try? await first.value
        XCTAssertEqual(server.state, .stopped, "cancelling start stops the process")
    }
}
