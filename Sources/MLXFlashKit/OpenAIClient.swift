import Foundation
#if canImport(FoundationNetworking)
import FoundationNetworking
#endif

// MARK: - Errors

/// What can go wrong talking to the server, each with one readable sentence.
public enum OpenAIClientError: Error, LocalizedError, Equatable, Sendable {
    /// The server answered with an OpenAI-style error body (usually a 4xx status).
    case api(status: Int, detail: APIErrorDetail)
    /// The server answered with an error status and a body that is not an OpenAI error.
    case http(status: Int, body: String)
    /// No answer: connection refused, timeout, connection dropped mid-stream.
    case transport(String)
    /// The server answered 2xx with a body this client cannot read.
    case decoding(String)

    /// The server's message for `.api`, otherwise a description of the failure.
    public var message: String {
        switch self {
        case .api(_, let detail): return detail.message
        case .http(let status, let body):
            let text = body.trimmingCharacters(in: .whitespacesAndNewlines)
            return text.isEmpty ? "HTTP status \(status)" : "HTTP status \(status): \(text.prefix(300))"
        case .transport(let text): return text
        case .decoding(let text): return text
        }
    }

    /// The HTTP status, when the server answered.
    public var status: Int? {
        switch self {
        case .api(let status, _), .http(let status, _): return status
        case .transport, .decoding: return nil
        }
    }

    public var errorDescription: String? { message }

    /// Builds the error for a non-2xx answer from its body.
    static func from(status: Int, body: Data) -> OpenAIClientError {
        if let decoded = try? JSONDecoder().decode(APIErrorBody.self, from: body) {
            return .api(status: status, detail: decoded.error)
        }
        return .http(status: status, body: String(decoding: body, as: UTF8.self))
    }
}

// MARK: - Client

/// A client for the OpenAI-compatible endpoints of `python -m mlx_flash.server`.
///
/// Cancelling the `Task` that awaits a call (or consumes a stream) cancels the HTTP
/// request, so the server stops generating.
public struct OpenAIClient: Sendable {
    /// Server root, e.g. `http://127.0.0.1:8080` (a trailing `/v1` is accepted too).
    public var baseURL: URL
    /// Seconds without any bytes from the server before a request fails. Generous by
    /// default: a model bigger than memory can take a while for its first token.
    public var timeout: TimeInterval

    public init(baseURL: URL, timeout: TimeInterval = 600) {
        self.baseURL = baseURL
        self.timeout = timeout
    }

    /// The URL of an endpoint below `/v1`, e.g. `endpoint("models")`.
    public func endpoint(_ path: String) -> URL {
        var root = baseURL.absoluteString
        while root.hasSuffix("/") { root.removeLast() }
        if !root.hasSuffix("/v1") { root += "/v1" }
        return URL(string: root + "/" + path)!
    }

    // MARK: Endpoints

    /// `GET /v1/models`: the models the server can answer with.
    public func models() async throws -> [ModelInfo] {
        var request = URLRequest(url: endpoint("models"), timeoutInterval: timeout)
        request.httpMethod = "GET"
        let data = try await send(request)
        return try decode(ModelList.self, from: data).data
    }

    /// `POST /v1/chat/completions` without streaming. `request.stream` is ignored.
    public func chat(_ request: ChatCompletionRequest) async throws -> ChatCompletionResponse {
        var body = request
        body.stream = false
        let data = try await send(try jsonRequest("chat/completions", body: body))
        if let error = try? JSONDecoder().decode(APIErrorBody.self, from: data) {
            throw OpenAIClientError.api(status: 200, detail: error.error)
        }
        return try decode(ChatCompletionResponse.self, from: data)
    }

    /// `POST /v1/chat/completions` with `"stream": true`: the reply as deltas, ending after
    /// `data: [DONE]`. Ending the consumer (cancel its task, or stop iterating) cancels
    /// the HTTP request.
    public func streamChat(_ request: ChatCompletionRequest) -> AsyncThrowingStream<ChatDelta, Error> {
        var body = request
        body.stream = true
        let urlRequest: URLRequest
        do {
            urlRequest = try jsonRequest("chat/completions", body: body)
        } catch {
            return AsyncThrowingStream { $0.finish(throwing: error) }
        }
        return AsyncThrowingStream { continuation in
            let stream = ChatEventStream(continuation: continuation)
            stream.start(urlRequest)
        }
    }

    // MARK: Plumbing

    private func jsonRequest<Body: Encodable>(_ path: String, body: Body) throws -> URLRequest {
        var request = URLRequest(url: endpoint(path), timeoutInterval: timeout)
        request.httpMethod = "POST"
        request.setValue("application/json", forHTTPHeaderField: "Content-Type")
        request.httpBody = try JSONEncoder().encode(body)
        return request
    }

    private func decode<T: Decodable>(_ type: T.Type, from data: Data) throws -> T {
        do {
            return try JSONDecoder().decode(type, from: data)
        } catch {
            let text = String(decoding: data.prefix(300), as: UTF8.self)
            throw OpenAIClientError.decoding("unexpected answer from the server (\(error)): \(text)")
        }
    }

    /// Sends `request` and returns the body of a 2xx answer; cancellable.
    private func send(_ request: URLRequest) async throws -> Data {
        let handle = TaskHandle()
        let url = request.url?.absoluteString ?? "?"
        return try await withTaskCancellationHandler {
            try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<Data, Error>) in
                let task = uncachedSession.dataTask(with: request) { data, response, error in
                    if let error {
                        continuation.resume(throwing: mapTransportError(error, url: url))
                        return
                    }
                    let status = (response as? HTTPURLResponse)?.statusCode ?? 0
                    let body = data ?? Data()
                    if (200..<300).contains(status) {
                        continuation.resume(returning: body)
                    } else {
                        continuation.resume(throwing: OpenAIClientError.from(status: status, body: body))
                    }
                }
                handle.set(task)
                task.resume()
            }
        } onCancel: {
            handle.cancel()
        }
    }
}

/// Sessions without a URLCache. On Linux, FoundationNetworking looks a request up in
/// the cache before its protocol exists; a `cancel()` landing in that window reports its
/// failure after the task has left the session's registry, which traps the process
/// ("Trying to access a behaviour for a task that in not in the registry").
/// The server's answers are never cacheable anyway.
func uncachedConfiguration() -> URLSessionConfiguration {
    let configuration = URLSessionConfiguration.ephemeral
    configuration.urlCache = nil
    configuration.requestCachePolicy = .reloadIgnoringLocalCacheData
    return configuration
}

/// The session for requests that are not streamed.
let uncachedSession = URLSession(configuration: uncachedConfiguration())

/// Turns a URLSession failure into `CancellationError` or `.transport`.
func mapTransportError(_ error: Error, url: String) -> Error {
    if let urlError = error as? URLError, urlError.code == .cancelled {
        return CancellationError()
    }
    return OpenAIClientError.transport("no answer from \(url): \(error.localizedDescription)")
}

/// Holds a URLSessionTask so a cancellation handler can reach it, even one that runs
/// before the task exists.
final class TaskHandle: @unchecked Sendable {
    private let lock = NSLock()
    private var task: URLSessionTask?
    private var cancelled = false

    func set(_ task: URLSessionTask) {
        lock.lock()
        self.task = task
        let cancelNow = cancelled
        lock.unlock()
        if cancelNow { task.cancel() }
    }

    func cancel() {
        lock.lock()
        cancelled = true
        let task = self.task
        lock.unlock()
        task?.cancel()
    }
}

// MARK: - Streaming

/// One streaming chat request: a URLSession data task whose delegate parses the
/// server-sent events as bytes arrive and yields `ChatDelta`s.
///
/// Uses the delegate API rather than `URLSession.bytes(for:)`, which
/// swift-corelibs-foundation (Linux) does not have. The session holds this delegate
/// until it is invalidated at the end of the request.
final class ChatEventStream: NSObject, URLSessionDataDelegate, @unchecked Sendable {
    typealias Continuation = AsyncThrowingStream<ChatDelta, Error>.Continuation

    private let continuation: Continuation
    // Recursive: finishing the continuation runs `onTermination`, which cancels the task.
    private let lock = NSRecursiveLock()
    // Guarded by `lock`; delegate callbacks arrive one at a time on the session's queue.
    private var parser = SSEParser()
    private var status: Int?
    private var errorBody = Data()
    private var finished = false   // no more events go to the consumer
    private var completed = false  // URLSession reported the end of the request
    private var sawFinishReason = false
    private var url = "?"

    init(continuation: Continuation) {
        self.continuation = continuation
    }

    func start(_ request: URLRequest) {
        var request = request
        request.setValue("text/event-stream", forHTTPHeaderField: "Accept")
        url = request.url?.absoluteString ?? "?"
        let configuration = uncachedConfiguration()
        configuration.timeoutIntervalForRequest = request.timeoutInterval
        let session = URLSession(configuration: configuration, delegate: self, delegateQueue: nil)
        let task = session.dataTask(with: request)
        continuation.onTermination = { [weak self] _ in
            // The stream ended or its consumer went away. Unless the request has already
            // completed, stop it: that closes the connection, and the server stops
            // generating. Marking the stream finished first keeps the cancelled request's
            // completion from racing the consumer's cancellation with an error.
            if self?.markFinished() == true { task.cancel() }
            // Releases this delegate once the task is over.
            session.finishTasksAndInvalidate()
        }
        task.resume()
    }

    // MARK: URLSessionDataDelegate

    func urlSession(_ session: URLSession, dataTask: URLSessionDataTask, didReceive data: Data) {
        lock.lock()
        defer { lock.unlock() }
        guard !finished else { return }
        if status == nil {
            status = (dataTask.response as? HTTPURLResponse)?.statusCode ?? 0
        }
        guard let status, (200..<300).contains(status) else {
            errorBody.append(data)
            return
        }
        for event in parser.feed(data) where !finished {
            handle(event)  // finishing the stream cancels the task (see onTermination)
        }
    }

    func urlSession(_ session: URLSession, task: URLSessionTask, didCompleteWithError error: Error?) {
        lock.lock()
        defer { lock.unlock() }
        completed = true
        guard !finished else { return }
        if status == nil {
            status = (task.response as? HTTPURLResponse)?.statusCode
        }
        if let error {
            finish(throwing: mapTransportError(error, url: url))
            return
        }
        guard let status, (200..<300).contains(status) else {
            finish(throwing: OpenAIClientError.from(status: status ?? 0, body: errorBody))
            return
        }
        for event in parser.finish() where !finished {
            handle(event)
        }
        guard !finished else { return }
        if sawFinishReason {
            finish(throwing: nil)  // no [DONE], but the reply was complete
        } else {
            finish(throwing: OpenAIClientError.transport(
                "the server closed the stream before the reply finished"))
        }
    }

    // MARK: Events

    /// Handles one event; caller holds `lock`.
    private func handle(_ event: SSEEvent) {
        let data = event.data.trimmingCharacters(in: .whitespaces)
        if data == "[DONE]" {
            finish(throwing: nil)
            return
        }
        let bytes = Data(data.utf8)
        if let error = try? JSONDecoder().decode(APIErrorBody.self, from: bytes) {
            finish(throwing: OpenAIClientError.api(status: status ?? 200, detail: error.error))
            return
        }
        do {
            let chunk = try JSONDecoder().decode(ChatCompletionChunk.self, from: bytes)
            let delta = ChatDelta(chunk: chunk)
            if delta.finishReason != nil { sawFinishReason = true }
            continuation.yield(delta)
        } catch {
            finish(throwing: OpenAIClientError.decoding(
                "unreadable stream chunk (\(error)): \(data.prefix(300))"))
        }
    }

    /// Marks the stream finished; true while the request is still running.
    private func markFinished() -> Bool {
        lock.lock()
        defer { lock.unlock() }
        finished = true
        return !completed
    }

    /// Ends the stream once; caller holds `lock`.
    private func finish(throwing error: Error?) {
        guard !finished else { return }
        finished = true
        continuation.finish(throwing: error)
    }
}
