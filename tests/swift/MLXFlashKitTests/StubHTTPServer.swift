import Foundation
import XCTest
#if canImport(Darwin)
import Darwin
#elseif canImport(Glibc)
import Glibc
#endif

/// A tiny HTTP/1.1 server on 127.0.0.1 for tests: one thread per connection, one
/// request per connection, canned answers. Enough to drive the client over a real
/// socket (chunked streaming, split writes, disconnects) without Python.
final class StubHTTPServer: @unchecked Sendable {
    struct Request: Sendable {
        var method: String
        var path: String
        var headers: [String: String]
        var body: Data

        var json: [String: Any]? {
            (try? JSONSerialization.jsonObject(with: body)) as? [String: Any]
        }
    }

    enum Response: Sendable {
        /// A whole body with Content-Length.
        case full(status: Int, contentType: String, body: Data)
        /// A chunked `text/event-stream` body written piece by piece, `delay` apart.
        /// With `hold`, keep the connection open afterwards (sending SSE comments)
        /// until the client goes away.
        case stream(pieces: [Data], delay: TimeInterval, hold: Bool)

        static func json(_ text: String, status: Int = 200) -> Response {
            .full(status: status, contentType: "application/json", body: Data(text.utf8))
        }

        static func events(_ text: String, splitEvery n: Int = 0, delay: TimeInterval = 0, hold: Bool = false) -> Response {
            let bytes = Array(text.utf8)
            guard n > 0 else { return .stream(pieces: [Data(bytes)], delay: delay, hold: hold) }
            let pieces = stride(from: 0, to: bytes.count, by: n).map {
                Data(bytes[$0..<min($0 + n, bytes.count)])
            }
            return .stream(pieces: pieces, delay: delay, hold: hold)
        }
    }

    let port: Int
    private let listener: Int32
    private let handler: @Sendable (Request) -> Response
    private let lock = NSLock()
    private var _requests: [Request] = []
    private var _disconnects = 0
    private var stopped = false

    /// Every request received so far.
    var requests: [Request] { locked { _requests } }
    /// How many held streams ended because the client closed the connection.
    var disconnects: Int { locked { _disconnects } }

    /// Listens on `port` (0: a free one) until `stop()`.
    init(port: Int = 0, handler: @escaping @Sendable (Request) -> Response) throws {
        self.handler = handler
        let (fd, port) = try Socket.listen(port: port)
        self.listener = fd
        self.port = port
        let thread = Thread { [self] in acceptLoop() }
        thread.start()
    }

    /// `NSLock.withLock` is not in the macOS 13 SDK.
    private func locked<T>(_ body: () throws -> T) rethrows -> T {
        lock.lock()
        defer { lock.unlock() }
        return try body()
    }

    var baseURL: URL { URL(string: "http://127.0.0.1:\(port)")! }

    func stop() {
        let wasStopped = locked { () -> Bool in
            defer { stopped = true }
            return stopped
        }
        if !wasStopped {
            _ = shutdown(listener, Int32(SHUT_RDWR))
            _ = close(listener)
        }
    }

    /// Waits up to `timeout` seconds for `condition`.
    func wait(timeout: TimeInterval = 5, until condition: () -> Bool) -> Bool {
        let deadline = Date().addingTimeInterval(timeout)
        while !condition() {
            if Date() > deadline { return false }
            Thread.sleep(forTimeInterval: 0.01)
        }
        return true
    }

    // MARK: Connections

    private func acceptLoop() {
        while true {
            let client = accept(listener, nil, nil)
            if client < 0 {
                if locked({ stopped }) { return }
                if errno == EINTR { continue }
                return
            }
            Socket.disableSIGPIPE(client)
            let thread = Thread { [self] in serve(client) }
            thread.start()
        }
    }

    private func serve(_ fd: Int32) {
        defer { _ = close(fd) }
        guard let request = readRequest(fd) else { return }
        locked { _requests.append(request) }
        switch handler(request) {
        case .full(let status, let contentType, let body):
            let head = "HTTP/1.1 \(status) \(Self.reason(status))\r\nContent-Type: \(contentType)\r\n"
                + "Content-Length: \(body.count)\r\nConnection: close\r\n\r\n"
            _ = Socket.write(fd, Data(head.utf8) + body)
        case .stream(let pieces, let delay, let hold):
            let head = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
                + "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
            guard Socket.write(fd, Data(head.utf8)) else { return }
            for piece in pieces {
                if delay > 0 { Thread.sleep(forTimeInterval: delay) }
                guard Socket.write(fd, Self.chunk(piece)) else { return }
            }
            if hold {
                // Keep-alive comments until the client hangs up (or 10 s pass).
                let deadline = Date().addingTimeInterval(10)
                while Date() < deadline, !locked({ stopped }) {
                    Thread.sleep(forTimeInterval: 0.05)
                    if !Socket.write(fd, Self.chunk(Data(": ping\n\n".utf8))) || Socket.peerClosed(fd) {
                        locked { _disconnects += 1 }
                        return
                    }
                }
                return
            }
            _ = Socket.write(fd, Data("0\r\n\r\n".utf8))
        }
    }

    private func readRequest(_ fd: Int32) -> Request? {
        var data = Data()
        var buffer = [UInt8](repeating: 0, count: 65536)
        let separator = Data("\r\n\r\n".utf8)
        var headerEnd: Range<Data.Index>?
        while headerEnd == nil {
            let n = recv(fd, &buffer, buffer.count, 0)
            if n <= 0 { return nil }
            data.append(contentsOf: buffer[0..<n])
            headerEnd = data.range(of: separator)
        }
        let head = String(decoding: data[..<headerEnd!.lowerBound], as: UTF8.self)
        var lines = head.components(separatedBy: "\r\n")
        let requestLine = lines.removeFirst().split(separator: " ")
        guard requestLine.count >= 2 else { return nil }
        var headers: [String: String] = [:]
        for line in lines {
            guard let colon = line.firstIndex(of: ":") else { continue }
            let name = line[..<colon].lowercased()
            headers[name] = line[line.index(after: colon)...].trimmingCharacters(in: .whitespaces)
        }
        var body = Data(data[headerEnd!.upperBound...])
        let length = Int(headers["content-length"] ?? "0") ?? 0
        while body.count < length {
            let n = recv(fd, &buffer, buffer.count, 0)
            if n <= 0 { return nil }
            body.append(contentsOf: buffer[0..<n])
        }
        return Request(
            method: String(requestLine[0]), path: String(requestLine[1]), headers: headers, body: body)
    }

    private static func chunk(_ piece: Data) -> Data {
        Data(String(piece.count, radix: 16).utf8) + Data("\r\n".utf8) + piece + Data("\r\n".utf8)
    }

    private static func reason(_ status: Int) -> String {
        switch status {
        case 200: return "OK"
        case 400: return "Bad Request"
        case 404: return "Not Found"
        case 500: return "Internal Server Error"
        default: return "Status"
        }
    }
}

extension XCTestCase {
    /// A `StubHTTPServer` that stops when the test ends.
    func stubServer(port: Int = 0, handler: @escaping @Sendable (StubHTTPServer.Request) -> StubHTTPServer.Response) throws -> StubHTTPServer {
        let server = try StubHTTPServer(port: port, handler: handler)
        addTeardownBlock { server.stop() }
        return server
    }
}

// MARK: - Sockets

enum Socket {
    struct Failure: Error, CustomStringConvertible {
        var description: String
    }

    /// A listening socket on 127.0.0.1, on `port` or (with 0) one the system picks.
    static func listen(port: Int = 0) throws -> (fd: Int32, port: Int) {
        #if canImport(Darwin)
        let fd = socket(AF_INET, SOCK_STREAM, 0)
        #else
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        #endif
        guard fd >= 0 else { throw Failure(description: "socket() failed: \(errno)") }
        var yes: Int32 = 1
        _ = setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &yes, socklen_t(MemoryLayout<Int32>.size))
        var address = sockaddr_in()
        #if canImport(Darwin)
        address.sin_len = UInt8(MemoryLayout<sockaddr_in>.size)
        #endif
        address.sin_family = sa_family_t(AF_INET)
        address.sin_port = in_port_t(UInt16(port)).bigEndian
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        let bound = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size))
            }
        }
        guard bound == 0, systemListen(fd, 64) == 0 else {
            _ = close(fd)
            throw Failure(description: "bind/listen failed: \(errno)")
        }
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        _ = withUnsafeMutablePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &length) }
        }
        return (fd, Int(UInt16(bigEndian: address.sin_port)))
    }

    /// A TCP port that was free a moment ago.
    static func freePort() throws -> Int {
        let (fd, port) = try listen()
        _ = close(fd)
        return port
    }

    static func disableSIGPIPE(_ fd: Int32) {
        #if canImport(Darwin)
        var yes: Int32 = 1
        _ = setsockopt(fd, SOL_SOCKET, SO_NOSIGPIPE, &yes, socklen_t(MemoryLayout<Int32>.size))
        #endif
    }

    /// Writes all of `data`; false once the peer has gone.
    static func write(_ fd: Int32, _ data: Data) -> Bool {
        #if canImport(Darwin)
        let flags: Int32 = 0
        #else
        let flags = Int32(MSG_NOSIGNAL)
        #endif
        return data.withUnsafeBytes { raw -> Bool in
            var offset = 0
            while offset < raw.count {
                let n = send(fd, raw.baseAddress! + offset, raw.count - offset, flags)
                if n <= 0 { return false }
                offset += n
            }
            return true
        }
    }

    /// True when the peer has closed its end.
    static func peerClosed(_ fd: Int32) -> Bool {
        var byte: UInt8 = 0
        let n = recv(fd, &byte, 1, Int32(MSG_PEEK | MSG_DONTWAIT))
        return n == 0
    }
}

/// The C `listen`, which `Socket.listen` shadows inside the enum.
private func systemListen(_ fd: Int32, _ backlog: Int32) -> Int32 {
    listen(fd, backlog)
}
