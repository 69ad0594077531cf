#if os(macOS) && canImport(SwiftUI)
import AppKit
import MLXFlashKit
import SwiftUI

/// A menu-bar chat window over MLXFlashKit. All logic lives in the library; this target
/// only routes events (AppModel) and renders state (ChatView, SettingsView).
@main
struct MLXFlashChatApp: App {
    @NSApplicationDelegateAdaptor(AppDelegate.self) private var appDelegate
    @StateObject private var model = AppModel()

    var body: some Scene {
        MenuBarExtra("MLX Flash", systemImage: "bolt.horizontal.circle") {
            ChatView()
                .environmentObject(model)
                .frame(width: 420, height: 560)
                .onAppear { appDelegate.model = model }
        }
        .menuBarExtraStyle(.window)
    }
}

/// Stops a server this app started when the app quits.
@MainActor
final class AppDelegate: NSObject, NSApplicationDelegate {
    weak var model: AppModel?

    func applicationDidFinishLaunching(_ notification: Notification) {
        // `swift run` starts a plain executable: make it a menu-bar (accessory) app.
        NSApp.setActivationPolicy(.accessory)
    }

    func applicationWillTerminate(_ notification: Notification) {
        model?.serverProcess.signalStop()
    }
}
#endif
