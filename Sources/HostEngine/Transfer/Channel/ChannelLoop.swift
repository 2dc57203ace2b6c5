// The one skeleton every transfer thread runs: one io_uring serving that thread's channels. Receivers
// (MessageStream), send queues (SendQueue) and watched eventfds register with a named tag; each turn
// pumps the queues, waits for a completion or the earliest wake-up (link emulation, the caller's tick),
// and hands each completion to the handler of its tag. Tags have one meaning on both sides, so a trace
// line reads the same on source and destination. Not thread-safe: a loop lives on one thread.

import EpcopyProtocol

/// Completion tags (io_uring user_data), shared by every loop.
public enum CompletionTag: UInt64, CaseIterable, Sendable {
    case controlReceive = 1
    case controlSend = 2
    case urgentReceive = 3
    case urgentSend = 4
    case bulkReceive = 5
    case bulkSend = 6
    /// The fault thread has queued page requests (destination).
    case requests = 7
    /// The owner asks the loop to end.
    case quit = 8

    /// The tags of a channel's receive and send. (A daemon link carries control traffic; no loop drives one
    /// today, and if one does it reads as control.)
    public static func receive(_ kind: PeerChannelKind) -> CompletionTag {
        switch kind {
        case .control, .daemon: .controlReceive
        case .urgent: .urgentReceive
        case .bulk: .bulkReceive
        }
    }

    public static func send(_ kind: PeerChannelKind) -> CompletionTag {
        switch kind {
        case .control, .daemon: .controlSend
        case .urgent: .urgentSend
        case .bulk: .bulkSend
        }
    }
}

public final class ChannelLoop {
    public let ring: Ring
    private var handlers: [((Completion) throws -> Void)?]
    private var queues: [SendQueue] = []
    /// Buffer groups handed out to receivers (one per MessageStream on this ring).
    private var nextGroup: UInt16 = 1

    public init(entries: UInt32) throws(SyscallError) {
        ring = try Ring(entries: entries)
        handlers = Array(repeating: nil, count: CompletionTag.allCases.count + 1)
    }

    /// Handles completions of `tag` (custom receivers, such as the bulk page receiver).
    public func on(_ tag: CompletionTag, _ handler: @escaping (Completion) throws -> Void) {
        precondition(handlers[Int(tag.rawValue)] == nil, "tag \(tag) registered twice")
        handlers[Int(tag.rawValue)] = handler
    }

    /// Receives messages on `channel`'s descriptor with an armed multishot receive, starting with the bytes
    /// the handshake already read. `onMessage` sees every validated message; `onClosed` is called once when
    /// the peer closes or resets the connection.
    @discardableResult
    public func receive(on channel: PeerChannel, onMessage: @escaping (PeerMessage) throws -> Void,
                        onClosed: @escaping () throws -> Void) throws -> MessageStream {
        let tag = CompletionTag.receive(channel.channel)
        let stream = try MessageStream(fd: channel.descriptor.rawValue, tag: tag.rawValue, channel: channel.channel,
                                       ring: ring, group: nextGroup, context: channel.context,
                                       alreadyRead: channel.takeBufferedBytes())
        nextGroup += 1
        try stream.arm(ring)
        try stream.drainBuffered(onMessage)
        var reportedClosed = false
        on(tag) { [ring] completion in
            try stream.complete(completion, ring: ring, onMessage)
            if stream.closed && !reportedClosed {
                reportedClosed = true
                try onClosed()
            }
        }
        return stream
    }

    /// A send queue for `fd` whose completed frames go to `onSent` (accounting).
    public func sendQueue(fd: Int32, kind: PeerChannelKind, shaper: LinkShaper?, sparse: Bool = true,
                          onSent: @escaping (OutgoingFrame) throws -> Void = { _ in }) -> SendQueue {
        let tag = CompletionTag.send(kind)
        let queue = SendQueue(fd: fd, tag: tag.rawValue, shaper: shaper, sparse: sparse)
        queues.append(queue)
        on(tag) { [ring] completion in
            if let frame = try queue.complete(completion, ring: ring) { try onSent(frame) }
        }
        return queue
    }

    /// Calls `body` whenever `fd` (an eventfd) becomes readable; the poll is re-armed when the kernel drops it.
    public func watch(fd: Int32, tag: CompletionTag, _ body: @escaping () throws -> Void) throws(SyscallError) {
        try ring.pollMultishot(fd: fd, userData: tag.rawValue)
        on(tag) { [ring] completion in
            if !completion.more { try ring.pollMultishot(fd: fd, userData: tag.rawValue) }
            try body()
        }
    }

    /// One turn: submit what the queues may send now, wait up to `maxWaitNanos` (or until the first queued
    /// frame's link-emulation time), and dispatch every completion that is ready.
    public func turn(now: UInt64, maxWaitNanos: Int64) throws {
        var wake: UInt64? = nil
        for queue in queues {
            if let t = try queue.pump(ring: ring, now: now) { wake = min(wake ?? t, t) }
        }
        let timeout = wake.map { min(Int64($0 &- now), maxWaitNanos) } ?? maxWaitNanos
        _ = try ring.submitAndWait(timeoutNanos: max(timeout, 1000))
        try ring.drainCompletions { completion in
            let index = Int(completion.userData)
            guard index < handlers.count, let handler = handlers[index] else { return }
            try handler(completion)
        }
    }
}
