#if os(macOS) && canImport(SwiftUI)
import Foundation
import MLXFlashKit
import SwiftUI

/// Routes UI events to the library's plain types and publishes their state for SwiftUI.
/// Holds no logic of its own beyond that.
@MainActor
final class AppModel: ObservableObject {
    let session: ChatSession
    let serverProcess = ServerProcess()
    private let settingsFile: URL
    private var startTask: Task<Void, Never>?

    @Published private(set) var settings: MLXFlashKit.Settings
    @Published private(set) var messages: [ChatMessage] = []
    @Published private(set) var isGenerating = false
    @Published private(set) var stats: GenerationStats?
    @Published private(set) var errorMessage: String?
    @Published private(set) var serverState: ServerProcess.State = .stopped

    init(settingsFile: URL = MLXFlashKit.Settings.defaultFile) {
        self.settingsFile = settingsFile
        var loadError: String?
        let settings: MLXFlashKit.Settings
        do {
            settings = try MLXFlashKit.Settings.load(from: settingsFile)
        } catch {
            settings = MLXFlashKit.Settings()
            loadError = error.localizedDescription
        }
        self.settings = settings
        self.session = ChatSession(settings: settings)
        self.errorMessage = loadError
        session.onChange = { [weak self] in self?.refresh() }
        serverProcess.onStateChange = { [weak self] state in
            self?.serverState = state
            if case .failed(let message) = state { self?.errorMessage = message }
        }
    }

    // MARK: Chat

    func send(_ text: String) {
        errorMessage = nil
        session.send(text)
    }

    func stop() {
        session.stop()
    }

    func newChat() {
        session.reset()
    }

    private func refresh() {
        messages = session.conversation.turns
        isGenerating = session.isGenerating
        stats = session.lastStats
        if let error = session.lastError { errorMessage = error }
    }

    // MARK: Settings

    func apply(_ newSettings: MLXFlashKit.Settings) {
        settings = newSettings
        session.settings = newSettings
        do {
            try newSettings.save(to: settingsFile)
        } catch {
            errorMessage = "cannot save the settings: \(error.localizedDescription)"
        }
    }

    // MARK: Server

    func startServer() {
        errorMessage = nil
        let configuration = settings.serverConfiguration
        startTask = Task {
            // Failures also arrive as `.failed` through onStateChange.
            try? await self.serverProcess.start(configuration)
        }
    }

    func stopServer() {
        if serverState == .starting {
            startTask?.cancel()  // start() stops the process when cancelled
        } else {
            Task { await self.serverProcess.stop() }
        }
    }
}
#endif
