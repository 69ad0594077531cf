#if os(macOS) && canImport(SwiftUI)
import MLXFlashKit
import SwiftUI

/// Edits a copy of the settings; Save hands it back to be applied and persisted.
struct SettingsView: View {
    @State private var draft: MLXFlashKit.Settings
    @State private var serverURL: String
    let onSave: (MLXFlashKit.Settings) -> Void
    let onCancel: () -> Void

    init(settings: MLXFlashKit.Settings,
         onSave: @escaping (MLXFlashKit.Settings) -> Void,
         onCancel: @escaping () -> Void) {
        _draft = State(initialValue: settings)
        _serverURL = State(initialValue: settings.serverURL.absoluteString)
        self.onSave = onSave
        self.onCancel = onCancel
    }

    /// The URL field parsed, if it is an http(s) URL with a host.
    private var parsedURL: URL? {
        guard let url = URL(string: serverURL.trimmingCharacters(in: .whitespaces)),
              let scheme = url.scheme, ["http", "https"].contains(scheme), url.host != nil
        else { return nil }
        return url
    }

    var body: some View {
        VStack(spacing: 0) {
            Form {
                Section("Server") {
                    TextField("URL", text: $serverURL, prompt: Text("http://127.0.0.1:8080"))
                    TextField("Python", text: $draft.pythonPath, prompt: Text(".venv/bin/python"))
                    TextField("Model", text: $draft.model, prompt: Text("smollm2-135m"))
                    Picker("Mode", selection: $draft.mode) {
                        ForEach(GenerationMode.allCases, id: \.self) { mode in
                            Text(mode.rawValue).tag(mode)
                        }
                    }
                    .pickerStyle(.segmented)
                    TextField("DRAM budget", text: $draft.dramBudget, prompt: Text("e.g. 1.5G or 0.6"))
                        .disabled(draft.mode != .flash)
                }
                Section("Generation") {
                    Slider(value: $draft.temperature, in: 0...2, step: 0.05) {
                        Text("Temperature \(draft.temperature, specifier: "%.2f")")
                    }
                    Slider(value: $draft.topP, in: 0.05...1, step: 0.05) {
                        Text("Top p \(draft.topP, specifier: "%.2f")")
                    }
                    Stepper("Max tokens: \(draft.maxTokens)", value: $draft.maxTokens, in: 16...8192, step: 16)
                    Stepper("History: \(draft.maxTurns) messages", value: $draft.maxTurns, in: 1...200)
                    TextField("System prompt", text: $draft.systemPrompt, axis: .vertical)
                        .lineLimit(1...4)
                }
            }
            .formStyle(.grouped)
            HStack {
                Text("Server settings apply at the next start.")
                    .font(.caption).foregroundColor(.secondary)
                Spacer()
                Button("Cancel", action: onCancel)
                    .keyboardShortcut(.cancelAction)
                Button("Save") {
                    guard let url = parsedURL else { return }
                    var settings = draft
                    settings.serverURL = url
                    onSave(settings)
                }
                .keyboardShortcut(.defaultAction)
                .disabled(parsedURL == nil || draft.model.trimmingCharacters(in: .whitespaces).isEmpty)
            }
            .padding(8)
        }
    }
}
#endif
