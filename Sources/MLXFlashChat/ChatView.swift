#if os(macOS) && canImport(SwiftUI)
import AppKit
import MLXFlashKit
import SwiftUI

/// The menu-bar window: server bar, messages, input with Send/Stop, statistics line.
struct ChatView: View {
    @EnvironmentObject private var model: AppModel
    @State private var draft = ""
    @State private var showingSettings = false

    var body: some View {
        VStack(spacing: 0) {
            serverBar
            Divider()
            if showingSettings {
                SettingsView(
                    settings: model.settings,
                    onSave: { settings in
                        model.apply(settings)
                        showingSettings = false
                    },
                    onCancel: { showingSettings = false })
            } else {
                messageList
                Divider()
                inputBar
                statusLine
            }
        }
    }

    // MARK: Server bar

    private var serverBar: some View {
        HStack(spacing: 8) {
            Circle().fill(serverColor).frame(width: 8, height: 8)
            Text(serverText).font(.caption).lineLimit(1).truncationMode(.middle)
            Spacer()
            switch model.serverState {
            case .stopped, .failed:
                Button("Start server") { model.startServer() }
            case .starting, .running:
                Button("Stop server") { model.stopServer() }
            }
            Button { model.newChat() } label: { Image(systemName: "square.and.pencil") }
                .help("New chat")
            Button { showingSettings.toggle() } label: { Image(systemName: "gearshape") }
                .help("Settings")
            Button { NSApp.terminate(nil) } label: { Image(systemName: "power") }
                .help("Quit (stops a server started here)")
        }
        .buttonStyle(.borderless)
        .padding(8)
    }

    private var serverText: String {
        switch model.serverState {
        case .stopped: return "Server not started here · \(model.settings.serverURL.absoluteString)"
        case .starting: return "Starting \(model.settings.model)…"
        case .running: return "\(model.settings.model) (\(model.settings.mode.rawValue)) on port \(model.settings.port)"
        case .failed(let message): return "Server failed: \(message)"
        }
    }

    private var serverColor: Color {
        switch model.serverState {
        case .stopped: return .gray
        case .starting: return .yellow
        case .running: return .green
        case .failed: return .red
        }
    }

    // MARK: Messages

    private var messageList: some View {
        ScrollViewReader { proxy in
            ScrollView {
                LazyVStack(alignment: .leading, spacing: 8) {
                    ForEach(model.messages) { message in
                        MessageRow(message: message, streaming: model.isGenerating && message.id == model.messages.last?.id)
                            .id(message.id)
                    }
                }
                .padding(10)
            }
            .onChange(of: model.messages.last?.content) { _ in
                if let id = model.messages.last?.id { proxy.scrollTo(id, anchor: .bottom) }
            }
        }
    }

    // MARK: Input

    private var inputBar: some View {
        HStack(alignment: .bottom, spacing: 8) {
            TextField("Message", text: $draft, axis: .vertical)
                .lineLimit(1...5)
                .textFieldStyle(.roundedBorder)
                .onSubmit { send() }
            if model.isGenerating {
                Button { model.stop() } label: { Image(systemName: "stop.circle.fill").font(.title2) }
                    .help("Stop generating")
            } else {
                Button { send() } label: { Image(systemName: "arrow.up.circle.fill").font(.title2) }
                    .disabled(draft.trimmingCharacters(in: .whitespacesAndNewlines).isEmpty)
                    .help("Send")
            }
        }
        .buttonStyle(.borderless)
        .padding(8)
    }

    private func send() {
        guard !model.isGenerating else { return }
        model.send(draft)
        draft = ""
    }

    // MARK: Status

    private var statusLine: some View {
        HStack {
            if let error = model.errorMessage {
                Text(error).foregroundColor(.red)
            } else if let stats = model.stats {
                Text(stats.summary).foregroundColor(.secondary)
            } else {
                Text("tokens/s and bytes read per token appear here").foregroundColor(.secondary)
            }
            Spacer()
        }
        .font(.caption)
        .lineLimit(2)
        .padding(.horizontal, 8)
        .padding(.bottom, 6)
    }
}

/// One message: user on the right, assistant on the left.
struct MessageRow: View {
    let message: ChatMessage
    let streaming: Bool

    var body: some View {
        HStack {
            if message.role == .user { Spacer(minLength: 40) }
            Group {
                if message.content.isEmpty && streaming {
                    ProgressView().controlSize(.small)
                } else {
                    Text(message.content).textSelection(.enabled)
                }
            }
            .padding(8)
            .background(
                RoundedRectangle(cornerRadius: 8)
                    .fill(message.role == .user ? Color.accentColor.opacity(0.2) : Color.secondary.opacity(0.12)))
            if message.role != .user { Spacer(minLength: 40) }
        }
    }
}
#endif
