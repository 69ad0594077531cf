import Foundation

// MARK: - Server-sent events

/// One dispatched server-sent event.
///
/// OpenAI-compatible servers send only `data:` fields (`data: {...}` followed by a blank
/// line, ending with `data: [DONE]`); the other fields are kept for completeness.
public struct SSEEvent: Equatable, Sendable {
    /// The `event:` field, or `nil` for the default ("message").
    public var event: String?
    /// All `data:` lines of the event joined with "\n".
    public var data: String
    /// The `id:` field, if any.
    public var id: String?

    public init(event: String? = nil, data: String, id: String? = nil) {
        self.event = event
        self.data = data
        self.id = id
    }
}

/// Incremental parser for a `text/event-stream` body.
///
/// Feed it bytes as they arrive, split anywhere (inside a line, inside a UTF-8 sequence,
/// between the CR and LF of a CRLF); it returns the events completed so far. Follows the
/// WHATWG rules: lines end with LF, CRLF or CR; a blank line dispatches the event; lines
/// starting with ":" are comments; one space after the colon is dropped.
public struct SSEParser: Sendable {
    private var buffer: [UInt8] = []
    private var skipLeadingLF = false  // the previous chunk ended with CR
    private var atStreamStart = true   // a UTF-8 BOM may precede the first line
    private var dataLines: [String] = []
    private var hasData = false
    private var eventName: String?
    private var lastID: String?

    public init() {}

    /// Parses `chunk` and returns the events it completed.
    public mutating func feed(_ chunk: Data) -> [SSEEvent] {
        feed(Array(chunk))
    }

    /// Parses `bytes` and returns the events they completed.
    public mutating func feed(_ bytes: [UInt8]) -> [SSEEvent] {
        var events: [SSEEvent] = []
        for byte in bytes {
            if skipLeadingLF {
                skipLeadingLF = false
                if byte == 0x0A { continue }
            }
            switch byte {
            case 0x0A:  // LF
                endLine(into: &events)
            case 0x0D:  // CR, possibly the first half of CRLF
                endLine(into: &events)
                skipLeadingLF = true
            default:
                buffer.append(byte)
            }
        }
        return events
    }

    /// Ends the stream: an unterminated last line and a pending event without its blank
    /// line are still returned (servers that close right after `data: [DONE]` lose nothing).
    public mutating func finish() -> [SSEEvent] {
        var events: [SSEEvent] = []
        if !buffer.isEmpty { endLine(into: &events) }
        dispatch(into: &events)
        skipLeadingLF = false
        return events
    }

    // MARK: Private

    private mutating func endLine(into events: inout [SSEEvent]) {
        var bytes = buffer[...]
        buffer.removeAll(keepingCapacity: true)
        if atStreamStart {
            atStreamStart = false
            if bytes.starts(with: [0xEF, 0xBB, 0xBF]) { bytes = bytes.dropFirst(3) }
        }
        if bytes.isEmpty {
            dispatch(into: &events)
            return
        }
        let line = String(decoding: bytes, as: UTF8.self)
        if line.hasPrefix(":") { return }  // comment, e.g. a keep-alive
        let field: Substring
        var value: Substring
        if let colon = line.firstIndex(of: ":") {
            field = line[..<colon]
            value = line[line.index(after: colon)...]
            if value.hasPrefix(" ") { value = value.dropFirst() }
        } else {
            field = line[...]
            value = ""
        }
        switch field {
        case "data":
            dataLines.append(String(value))
            hasData = true
        case "event":
            eventName = String(value)
        case "id":
            if !value.contains("\0") { lastID = String(value) }
        default:
            break  // "retry" and unknown fields are ignored
        }
    }

    private mutating func dispatch(into events: inout [SSEEvent]) {
        defer {
            dataLines.removeAll()
            hasData = false
            eventName = nil
        }
        guard hasData else { return }
        let name = (eventName?.isEmpty ?? true) ? nil : eventName
        events.append(SSEEvent(event: name, data: dataLines.joined(separator: "\n"), id: lastID))
    }
}
