// The agent's conversation with the host engine over its virtio-serial port. The host speaks first
// (hostHello) each time it connects — the source host before the switch, the destination host after it —
// and the agent answers requests: a hot report (census) before the switch, and at `vmResumed` a scan for free
// pages at once, since every page the destination engine learns is free before it is fetched is a page never
// sent. The agent process itself migrates with the guest, so the same loop simply finds a new host on the
// other side of the port.

#if canImport(Glibc)
import Glibc
#endif
import EpcopyProtocol

public struct AgentConfig: Sendable {
    public var portName: String = AgentPort.defaultName
    public var sources = CollectorSources()
    /// The longest observation window the agent grants a hot-report request.
    public var maxWindowMillis: UInt32 = 2000
    public var agentVersion = "epcopy-agent 0.5"

    public init() {}
}

public final class AgentService {
    public let config: AgentConfig
    private let log: (String) -> Void
    private var lastResume: UInt64?
    private var decoder = FrameDecoder(link: .agent)

    public init(config: AgentConfig, log: @escaping (String) -> Void) {
        self.config = config
        self.log = log
    }

    /// Serves forever: waits for the port to appear, then answers the host; reopens the port if it breaks.
    public func run() -> Never {
        signal(SIGPIPE, SIG_IGN)
        var announced = false
        while true {
            guard let node = AgentPort.find(name: config.portName) else {
                if !announced { log("waiting for virtio-serial port \(config.portName)") }
                announced = true
                usleep(500_000)
                continue
            }
            let fd = open(node, O_RDWR | O_CLOEXEC)
            guard fd >= 0 else {
                log("open \(node): \(String(cString: strerror(errno)))")
                usleep(1_000_000)
                continue
            }
            log("serving on \(node)")
            serve(fd: fd)
            close(fd)
            usleep(200_000)
        }
    }

    /// Answers frames on `fd` until a read fails.
    public func serve(fd: Int32) {
        var buffer = [UInt8](repeating: 0, count: 65536)
        decoder = FrameDecoder(link: .agent)
        while true {
            var pfd = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            let ready = poll(&pfd, 1, 1000)
            if ready < 0 && errno != EINTR { return }
            if ready <= 0 { continue }
            if pfd.revents & Int16(POLLIN) == 0 {
                // POLLHUP: no host on the other end (yet, or between the two hosts of a migration). Anything
                // half-received belonged to the host that left.
                decoder = FrameDecoder(link: .agent)
                usleep(100_000)
                continue
            }
            let n = read(fd, &buffer, buffer.count)
            if n < 0 {
                if errno == EINTR || errno == EAGAIN { continue }
                log("read: \(String(cString: strerror(errno)))")
                return
            }
            if n == 0 {
                decoder = FrameDecoder(link: .agent)
                usleep(100_000)
                continue
            }
            decoder.append(buffer[..<n])
            while true {
                let frame: Frame?
                do { frame = try decoder.next() } catch {
                    // A frame from a host that left mid-message, or garbage: start over with the next write.
                    log("dropping undecodable input: \(error)")
                    decoder = FrameDecoder(link: .agent)
                    break
                }
                guard let frame else { break }
                let message: AgentMessage
                do { message = try AgentMessage.decode(frame: frame, context: AgentDecodeContext()) } catch {
                    send(fd, .agentError(AgentErrorReport(code: 1, message: "cannot decode: \(error)")))
                    continue
                }
                for reply in respond(to: message) { send(fd, reply) }
            }
        }
    }

    /// The replies to one host message (pure apart from reading the collectors' files).
    public func respond(to message: AgentMessage) -> [AgentMessage] {
        switch message {
        case .hostHello:
            do {
                return [.agentHello(try AgentHello(agentVersion: config.agentVersion,
                                                   kernelRelease: GuestFiles.kernelRelease()))]
            } catch {
                return [.agentError(AgentErrorReport(code: 2, message: "hello: \(error)"))]
            }
        case .reportRequest(let request):
            switch request.kind {
            case .hot:
                do {
                    let census = try Collector.census(config.sources,
                                                      windowMillis: min(request.windowMillis, config.maxWindowMillis))
                    return [.hotReport(try census.hotReport(requestID: request.requestID))]
                } catch {
                    return [.agentError(AgentErrorReport(code: 3, message: "hot report: \(error)"))]
                }
            case .free:
                return [freeReport(requestID: request.requestID)]
            }
        case .vmResumed(let resumed):
            // A repeated notice for the same resume must not cost a second scan.
            guard lastResume != resumed.sequence else { return [] }
            lastResume = resumed.sequence
            return [freeReport(requestID: UInt32(truncatingIfNeeded: resumed.sequence))]
        case .ping(let nonce):
            return [.pong(nonce: nonce)]
        case .agentHello, .hotReport, .freeReport, .agentError, .pong:
            return [.agentError(AgentErrorReport(code: 4, message: "unexpected \(message.kind) from the host"))]
        }
    }

    private func freeReport(requestID: UInt32) -> AgentMessage {
        let start = GuestFiles.monotonicNanos()
        do {
            let ram = try Collector.ramMap(config.sources)
            let free = try Collector.freeFrames(config.sources, ramMap: ram)
            return .freeReport(FreeReport(requestID: requestID, scanMicros: (GuestFiles.monotonicNanos() - start) / 1000,
                                          free: free))
        } catch {
            return .agentError(AgentErrorReport(code: 5, message: "free scan: \(error)"))
        }
    }

    private func send(_ fd: Int32, _ message: AgentMessage) {
        let bytes = message.encodedFrame()
        var done = 0
        while done < bytes.count {
            let n = bytes.withUnsafeBytes { write(fd, $0.baseAddress! + done, bytes.count - done) }
            if n < 0 {
                if errno == EINTR { continue }
                if errno == EAGAIN { usleep(10_000); continue }
                log("write \(message.kind): \(String(cString: strerror(errno)))")
                return
            }
            done += n
        }
    }
}
