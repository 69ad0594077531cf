import XCTest
@testable import MLXFlashKit

final class SettingsTests: XCTestCase {
    private var dir: URL!

    override func setUpWithError() throws {
        dir = FileManager.default.temporaryDirectory
            .appendingPathComponent("mlx-flash-settings-\(UUID().uuidString)")
    }

    override func tearDownWithError() throws {
        try? FileManager.default.removeItem(at: dir)
    }

    func testDefaults() {
        let s = Settings(pythonPath: "python3")
        XCTAssertEqual(s.serverURL.absoluteString, "http://127.0.0.1:8080")
        XCTAssertEqual(s.port, 8080)
        XCTAssertEqual(s.model, "smollm2-135m")
        XCTAssertEqual(s.mode, .dense)
        XCTAssertEqual(s.client.endpoint("models").absoluteString, "http://127.0.0.1:8080/v1/models")
    }

    func testSaveAndLoadRoundTrip() throws {
        let file = dir.appendingPathComponent("nested/settings.json")
        let settings = Settings(
            serverURL: URL(string: "http://127.0.0.1:9123")!, model: "llama-7b", temperature: 0.2,
            topP: 0.95, maxTokens: 64, mode: .flash, dramBudget: "3G", pythonPath: "/opt/venv/bin/python",
            systemPrompt: "You are terse.", maxTurns: 6)
        try settings.save(to: file)
        XCTAssertEqual(try Settings.load(from: file), settings)

        let object = try XCTUnwrap(
            try JSONSerialization.jsonObject(with: Data(contentsOf: file)) as? [String: Any])
        XCTAssertEqual(object["server_url"] as? String, "http://127.0.0.1:9123")
        XCTAssertEqual(object["max_tokens"] as? Int, 64)
        XCTAssertEqual(object["top_p"] as? Double, 0.95)
        XCTAssertEqual(object["dram_budget"] as? String, "3G")
        XCTAssertEqual(object["python_path"] as? String, "/opt/venv/bin/python")
        XCTAssertEqual(object["mode"] as? String, "flash")

        var changed = settings
        changed.temperature = 1.0
        try changed.save(to: file)  // overwrites
        XCTAssertEqual(try Settings.load(from: file).temperature, 1.0)
    }

    func testMissingFileGivesDefaults() throws {
        let loaded = try Settings.load(from: dir.appendingPathComponent("none.json"))
        var expected = Settings()
        expected.pythonPath = loaded.pythonPath
        XCTAssertEqual(loaded, expected)
    }

    func testOlderFileKeepsDefaultsForMissingKeys() throws {
        let file = dir.appendingPathComponent("settings.json")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        try Data(#"{"model": "tiny", "mode": "flash"}"#.utf8).write(to: file)
        let loaded = try Settings.load(from: file)
        XCTAssertEqual(loaded.model, "tiny")
        XCTAssertEqual(loaded.mode, .flash)
        XCTAssertEqual(loaded.maxTokens, 512)
        XCTAssertEqual(loaded.port, 8080)
    }

    func testCorruptFileIsAnError() throws {
        let file = dir.appendingPathComponent("settings.json")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        try Data("{not json".utf8).write(to: file)
        XCTAssertThrowsError(try Settings.load(from: file)) { error in
            XCTAssertTrue(error.localizedDescription.contains(file.path), error.localizedDescription)
        }
    }

    func testServerConfiguration() {
        var s = Settings(serverURL: URL(string: "http://127.0.0.1:8123")!, model: "m", pythonPath: "/p/python")
        XCTAssertEqual(s.serverConfiguration.arguments, ["-m", "mlx_flash.server", "--model", "m", "--port", "8123"])
        s.mode = .flash
        XCTAssertEqual(s.serverConfiguration.arguments,
                       ["-m", "mlx_flash.server", "--model", "m", "--port", "8123", "--mode", "flash"])
        s.dramBudget = "0.6"
        XCTAssertEqual(s.serverConfiguration.arguments,
                       ["-m", "mlx_flash.server", "--model", "m", "--port", "8123", "--mode", "flash", "--dram-budget", "0.6"])
        XCTAssertEqual(s.serverConfiguration.python, "/p/python")
        s.mode = .dense
        XCTAssertFalse(s.serverConfiguration.arguments.contains("--dram-budget"), "the budget only applies to flash mode")
    }

    func testRequestFromSettings() {
        let s = Settings(temperature: 0.3, topP: 0.8, maxTokens: 32, pythonPath: "python3")
        let request = s.request(messages: [ChatMessage(role: .user, content: "x")], stream: true)
        XCTAssertEqual(request.model, "smollm2-135m")
        XCTAssertEqual(request.temperature, 0.3)
        XCTAssertEqual(request.topP, 0.8)
        XCTAssertEqual(request.maxTokens, 32)
        XCTAssertEqual(request.stream, true)
    }

    func testEndpointAcceptsV1Suffix() {
        XCTAssertEqual(OpenAIClient(baseURL: URL(string: "http://h:1/v1/")!).endpoint("models").absoluteString,
                       "http://h:1/v1/models")
        XCTAssertEqual(OpenAIClient(baseURL: URL(string: "http://h:1/")!).endpoint("chat/completions").absoluteString,
                       "http://h:1/v1/chat/completions")
    }

    func testFormatBytes() {
        XCTAssertEqual(GenerationStats.formatBytes(512), "512 B")
        XCTAssertEqual(GenerationStats.formatBytes(12_300_000), "12.3 MB")
        XCTAssertEqual(GenerationStats(tokensPerSecond: 20, msPerToken: 50, bytesReadPerToken: 1_500_000_000).summary,
                       "20.0 tok/s · 50.0 ms/token · 1.5 GB read/token")
        XCTAssertEqual(GenerationStats(completionTokens: 3).summary, "3 tokens")
    }
}
