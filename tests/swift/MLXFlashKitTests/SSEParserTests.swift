import XCTest
@testable import MLXFlashKit

final class SSEParserTests: XCTestCase {
    /// Parses `bytes` fed in the given pieces, then finishes the stream.
    private func parse(_ pieces: [[UInt8]]) -> [SSEEvent] {
        var parser = SSEParser()
        var events: [SSEEvent] = []
        for piece in pieces { events += parser.feed(piece) }
        return events + parser.finish()
    }

    private func parse(_ text: String) -> [SSEEvent] {
        parse([Array(text.utf8)])
    }

    func testSingleDataEvent() {
        XCTAssertEqual(parse("data: {\"a\":1}\n\n"), [SSEEvent(data: "{\"a\":1}")])
    }

    func testOpenAIStreamWithDone() {
        let text = "data: {\"x\":1}\n\ndata: {\"x\":2}\n\ndata: [DONE]\n\n"
        XCTAssertEqual(parse(text).map(\.data), ["{\"x\":1}", "{\"x\":2}", "[DONE]"])
    }

    func testEventsAreReturnedAsSoonAsComplete() {
        var parser = SSEParser()
        XCTAssertEqual(parser.feed(Array("data: one\n".utf8)), [])
        XCTAssertEqual(parser.feed(Array("\ndata: tw".utf8)), [SSEEvent(data: "one")])
        XCTAssertEqual(parser.feed(Array("o\n\n".utf8)), [SSEEvent(data: "two")])
        XCTAssertEqual(parser.finish(), [])
    }

    /// The same stream split into three pieces at every pair of positions gives the
    /// same events: covers splits inside "data:", inside JSON, between CR and LF, and
    /// inside multi-byte UTF-8 characters.
    func testSplitAnywhere() {
        let text = ": keep-alive\r\n"
            + "data: {\"content\":\"héllo 🌍\"}\r\n\r\n"
            + "event: update\nid: 7\ndata: line one\ndata: line two\n\n"
            + "data:no-space\r\r"
            + "data: [DONE]\n\n"
        let expected = [
            SSEEvent(data: "{\"content\":\"héllo 🌍\"}"),
            SSEEvent(event: "update", data: "line one\nline two", id: "7"),
            SSEEvent(data: "no-space", id: "7"),
            SSEEvent(data: "[DONE]", id: "7"),
        ]
        let bytes = Array(text.utf8)
        XCTAssertEqual(parse([bytes]), expected)
        for i in 0...bytes.count {
            for j in i...bytes.count {
                let pieces = [Array(bytes[..<i]), Array(bytes[i..<j]), Array(bytes[j...])]
                XCTAssertEqual(parse(pieces), expected, "split at \(i), \(j)")
            }
        }
    }

    func testByteByByte() {
        let text = "data: a\r\n\r\ndata: b\n\n"
        XCTAssertEqual(parse(text.utf8.map { [$0] }).map(\.data), ["a", "b"])
    }

    func testLineEndings() {
        XCTAssertEqual(parse("data: a\r\n\r\n").map(\.data), ["a"])
        XCTAssertEqual(parse("data: a\r\rdata: b\r\r").map(\.data), ["a", "b"])
        XCTAssertEqual(parse("data: a\n\n").map(\.data), ["a"])
    }

    func testCRAtEndOfChunkThenLF() {
        var parser = SSEParser()
        XCTAssertEqual(parser.feed(Array("data: a\r".utf8)), [])
        // The LF completes the CRLF; it is not a second (blank) line.
        XCTAssertEqual(parser.feed(Array("\n".utf8)), [])
        XCTAssertEqual(parser.feed(Array("\r\n".utf8)), [SSEEvent(data: "a")])
    }

    func testFieldParsing() {
        XCTAssertEqual(parse("data:x\n\n").map(\.data), ["x"])
        XCTAssertEqual(parse("data:  x\n\n").map(\.data), [" x"], "only one space is dropped")
        XCTAssertEqual(parse("data\n\n").map(\.data), [""], "a field without colon has empty value")
        XCTAssertEqual(parse("data: a:b\n\n").map(\.data), ["a:b"])
        XCTAssertEqual(parse("retry: 10\nfoo: bar\ndata: x\n\n"), [SSEEvent(data: "x")])
    }

    func testCommentsAndBlankLinesAloneDispatchNothing() {
        XCTAssertEqual(parse(": ping\n\n\n\n: another\n\n"), [])
        XCTAssertEqual(parse("event: x\n\n"), [], "an event without data is not dispatched")
    }

    func testEventNameDoesNotCarryOver() {
        let events = parse("event: a\ndata: 1\n\ndata: 2\n\n")
        XCTAssertEqual(events.map(\.event), ["a", nil])
    }

    func testFinishFlushesUnterminatedEvent() {
        XCTAssertEqual(parse("data: [DONE]").map(\.data), ["[DONE]"])
        XCTAssertEqual(parse("data: last\n").map(\.data), ["last"])
    }

    func testByteOrderMarkIsSkipped() {
        XCTAssertEqual(parse([[0xEF, 0xBB, 0xBF], Array("data: x\n\n".utf8)]).map(\.data), ["x"])
    }

    func testFeedData() {
        var parser = SSEParser()
        XCTAssertEqual(parser.feed(Data("data: d\n\n".utf8)), [SSEEvent(data: "d")])
    }
}
