// The host end of the guest agent's virtio-serial port (QEMU's chardev socket). The source asks the agent for a
// hot report before the switch; the destination tells it the VM resumed and takes its free-page report. The agent
// runs inside the guest, so everything it sends is untrusted: frames are bounded by size, each call by a
// deadline, a byte budget and a message budget; garbage is skipped to the next frame magic; page numbers are
// checked against the guest's RAM layout. A lying agent can slow its own migration, never corrupt it: the
// engine uses a hot report only for push order, and a free report only for pages not yet on the destination
// (see DestinationEngine.markFree).

import CEpcopyLinux
import EpcopyProtocol
import Logging
#if canImport(Glibc)
import Glibc
#endif

public enum AgentLinkError: Error, CustomStringConvertible, Equatable {
    case connect(String)
    /// Nothing usable arrived in time: no agent, or it is too slow.
    case timeout(waitingFor: String, millis: UInt64)
    case closed(waitingFor: String)
    /// The agent sent more than a well-behaved one ever would.
    case flood(String)
    case agentFailed(code: UInt16, message: String)
    /// The caller gave up (`AgentLink.cancelled`), e.g. a background keeper stopped for a migration.
    case cancelled

    public var description: String {
        switch self {
        case .connect(let why): "cannot reach the agent port: \(why)"
        case .timeout(let what, let ms): "no \(what) from the guest agent within \(ms) ms"
        case .closed(let what): "the agent port closed while waiting for \(what)"
        case .flood(let why): "guest agent flood: \(why)"
        case .agentFailed(let code, let message): "the guest agent failed (code \(code)): \(message)"
        case .cancelled: "the request was cancelled"
        }
    }
}

/// Bounds on what one request may cost us.
public struct AgentLinkLimits: Sendable {
    /// Largest agent frame payload (a hot report of a 1 TiB guest as bitmaps is ~32 MiB; 16 MiB is plenty here).
    public var maxPayload: UInt32 = 16 << 20
    /// Bytes read while waiting for one answer.
    public var maxBytesPerCall = 64 << 20
    /// Messages read while waiting for one answer.
    public var maxMessagesPerCall = 1024
    /// Most ranges in one page set.
    public var maxRangesPerSet = 1 << 20

    public init() {}
}

/// One request at a time, from one thread at a time (it is handed from set-up to the RESUME watcher).
public final class AgentLink: @unchecked Sendable {
    public let socketPath: String
    public let layout: GuestRAMLayout
    public let limits: AgentLinkLimits
    /// Things the agent did wrong that were survived (rejected frames, frames outside RAM), for the output.
    public private(set) var complaints: [String] = []
    /// Checked about every 100 ms while waiting for an answer; true ends the wait with `.cancelled`.
    public var cancelled: (@Sendable () -> Bool)?
    private let fd: FileDescriptor
    private var buffer: [UInt8] = []
    private var nextRequest: UInt32 = 1

    /// Connects to QEMU's end of the agent port.
    public init(socketPath: String, layout: GuestRAMLayout, limits: AgentLinkLimits = AgentLinkLimits())
        throws(AgentLinkError) {
        self.socketPath = socketPath
        self.layout = layout
        self.limits = limits
        do { fd = try UnixStream.connect(socketPath, sendTimeoutSeconds: 2) } catch {
            throw .connect(error.description)
        }
    }

    /// hostHello → agentHello: is an agent there, and which?
    public func hello(timeoutMillis: UInt64) throws(AgentLinkError) -> AgentHello {
        try send(.hostHello(try! HostHello(version: WireVersion.current)))
        return try waitFor("agentHello", timeoutMillis: timeoutMillis) { message in
            if case .agentHello(let hello) = message { return hello }
            return nil
        }
    }

    /// A hot report, its frames checked against the RAM layout and turned into RAM-file pages per class.
    public func hotReport(windowMillis: UInt32, timeoutMillis: UInt64) throws(AgentLinkError)
        -> (report: HotReport, pages: [(PageClass, PageSet<PageIndex>)]) {
        let id = nextRequest
        nextRequest &+= 1
        try send(.reportRequest(try! ReportRequest(requestID: id, kind: .hot, windowMillis: windowMillis)))
        let report = try waitFor("hot report", timeoutMillis: timeoutMillis) { message -> HotReport? in
            if case .hotReport(let r) = message, r.requestID == id { return r }
            return nil
        }
        var pages: [(PageClass, PageSet<PageIndex>)] = []
        for entry in report.classes {
            let (set, outside) = layout.pages(entry.pages)
            if outside > 0 { complain("hot report: \(outside) \(entry.pageClass) frames outside guest RAM ignored") }
            pages.append((entry.pageClass, set))
        }
        return (report, pages)
    }

    /// Tells the agent the VM resumed here and waits for its free scan; returns RAM-file pages.
    public func freeAfterResume(sequence: UInt64, timeoutMillis: UInt64) throws(AgentLinkError)
        -> (report: FreeReport, pages: PageSet<PageIndex>) {
        try send(.vmResumed(VMResumed(sequence: sequence)))
        let id = UInt32(truncatingIfNeeded: sequence)
        let report = try waitFor("free report", timeoutMillis: timeoutMillis) { message -> FreeReport? in
            if case .freeReport(let r) = message, r.requestID == id { return r }
            return nil
        }
        let (set, outside) = layout.pages(report.free)
        if outside > 0 { complain("free report: \(outside) frames outside guest RAM ignored") }
        return (report, set)
    }

    private func complain(_ text: String) {
        if complaints.count < 32 { complaints.append(text) }
        Log.agentLink.trace("agent link: \(text)")
    }

    private func send(_ message: AgentMessage) throws(AgentLinkError) {
        let bytes = message.encodedFrame()
        let sent = bytes.withUnsafeBytes { raw in
            Result { () throws(SyscallError) in try TCP.sendAll(fd.rawValue, raw) }
        }
        if case .failure(let error) = sent { throw .closed(waitingFor: "\(message.kind) to be sent (\(error))") }
    }

    /// Reads frames until `match` accepts one. Other messages are skipped (pongs, stale answers) or noted
    /// (agent errors: the last one is thrown if time runs out); undecodable bytes are skipped up to the next
    /// frame magic.
    private func waitFor<T>(_ what: String, timeoutMillis: UInt64, _ match: (AgentMessage) -> T?)
        throws(AgentLinkError) -> T {
        let deadline = monotonicNanos() + timeoutMillis * 1_000_000
        var bytesRead = 0
        var messages = 0
        var lastAgentError: AgentErrorReport?
        var chunk = [UInt8](repeating: 0, count: 65536)
        let context = AgentDecodeContext(maxFrame: layout.frameLimit, maxRAMRanges: 1024,
                                         maxRangesPerSet: limits.maxRangesPerSet)
        while true {
            if let cancelled, cancelled() { throw .cancelled }
            while let message = nextMessage(context: context) {
                messages += 1
                if let found = match(message) { return found }
                if case .agentError(let e) = message {
                    complain("agent error \(e.code): \(e.message)")
                    lastAgentError = e
                }
                if messages > limits.maxMessagesPerCall {
                    throw .flood("more than \(limits.maxMessagesPerCall) messages while waiting for \(what)")
                }
            }
            let now = monotonicNanos()
            guard now < deadline else {
                if let e = lastAgentError { throw .agentFailed(code: e.code, message: e.message) }
                throw .timeout(waitingFor: what, millis: timeoutMillis)
            }
            let wait = Int32(min((deadline - now) / 1_000_000 + 1, cancelled == nil ? 1000 : 100))
            let received = chunk.withUnsafeMutableBytes { raw in
                Result { () throws(SyscallError) in try TCP.receive(fd.rawValue, into: raw, timeoutMillis: wait) }
            }
            let n: Int
            switch received {
            case .success(let count): n = count
            case .failure(let error) where error.errno == ETIMEDOUT: continue
            case .failure(let error): throw .closed(waitingFor: "\(what) (\(error))")
            }
            if n == 0 { throw .closed(waitingFor: what) }
            bytesRead += n
            guard bytesRead <= limits.maxBytesPerCall else {
                throw .flood("more than \(limits.maxBytesPerCall >> 20) MiB while waiting for \(what)")
            }
            buffer.append(contentsOf: chunk[..<n])
        }
    }

    /// The next decodable message in the buffer, skipping garbage; nil if more bytes are needed.
    private func nextMessage(context: AgentDecodeContext) -> AgentMessage? {
        let limits = FrameLimits(maxPayload: self.limits.maxPayload)
        while buffer.count >= FrameHeader.size {
            let parsed = buffer.withUnsafeBytes { raw in
                Result { () throws(ProtocolError) in
                    try FrameHeader.parse(UnsafeRawBufferPointer(rebasing: raw[0..<FrameHeader.size]), link: .agent,
                                          limits: limits)
                }
            }
            let header: FrameHeader
            switch parsed {
            case .success(let h): header = h
            case .failure(let error):
                complain("skipping bytes: \(error)")
                resync()
                continue
            }
            let total = FrameHeader.size + header.length
            guard buffer.count >= total else { return nil }
            let result = buffer.withUnsafeBytes { raw -> Result<AgentMessage, ProtocolError> in
                let head = UnsafeRawBufferPointer(rebasing: raw[0..<FrameHeader.size])
                let payload = UnsafeRawBufferPointer(rebasing: raw[FrameHeader.size..<total])
                return Result { () throws(ProtocolError) in
                    try header.verify(header: head, payload: payload, checksum: CRC32C.software)
                    return try AgentMessage.decode(type: header.type, payload: payload, context: context)
                }
            }
            switch result {
            case .success(let message):
                buffer.removeFirst(total)
                return message
            case .failure(let error):
                complain("rejected a \(header.length)-byte frame: \(error)")
                buffer.removeFirst(total)
            }
        }
        return nil
    }

    /// Drops bytes up to the next occurrence of the agent link's magic (after the first byte).
    private func resync() {
        let magic = withUnsafeBytes(of: Link.agent.magic.littleEndian) { Array($0) }
        var i = 1
        while i + magic.count <= buffer.count {
            if buffer[i] == magic[0], Array(buffer[i..<(i + magic.count)]) == magic { break }
            i += 1
        }
        buffer.removeFirst(min(i, buffer.count))
    }
}
