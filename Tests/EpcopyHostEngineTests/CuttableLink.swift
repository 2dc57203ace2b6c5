// A real TCP relay between a source engine and its destination that a test can break the ways a network
// does: every connection reset (RST to both ends), or black-holed (bytes stop moving and nobody is told),
// and then restored. While it is cut, new connections are accepted and dropped at once, as a host that is
// reachable but whose peer is gone. One thread runs the relay with poll(); the test only sets its mode.

import EpcopyHostEngine
import Foundation
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

final class CuttableLink: @unchecked Sendable {
    // SAFETY (@unchecked): the relay's descriptors belong to its thread alone; the test shares only `mode`,
    // the counters and the stop flag, which are atomic.
    enum Mode: Int { case up = 0, blackHole = 1, reset = 2 }

    /// Where the source connects.
    let endpoint: Endpoint
    private let target: Endpoint
    private let listenFD: Int32
    private let mode = Atomic<Int>(Mode.up.rawValue)
    private let stopping = Atomic<Bool>(false)
    private let accepted = Atomic<Int>(0)
    private let resets = Atomic<Int>(0)
    private var thread: Thread?
    private let done = DispatchSemaphore(value: 0)

    /// Connections relayed so far (a reconnecting source opens three more per session).
    var connections: Int { accepted.load(ordering: .relaxed) }

    init(to target: Endpoint) throws {
        self.target = target
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw CuttableLinkError("socket: \(String(cString: strerror(errno)))") }
        var one: Int32 = 1
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_addr.s_addr = inet_addr("127.0.0.1")
        let bound = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        guard bound == 0, listen(fd, 16) == 0 else {
            close(fd)
            throw CuttableLinkError("bind/listen: \(String(cString: strerror(errno)))")
        }
        var len = socklen_t(MemoryLayout<sockaddr_in>.size)
        _ = withUnsafeMutablePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &len) }
        }
        listenFD = fd
        endpoint = Endpoint(host: "127.0.0.1", port: UInt16(bigEndian: addr.sin_port))
        let thread = Thread { [self] in relay() }
        thread.name = "test-link"
        self.thread = thread
        thread.start()
    }

    /// Resets every open connection (both ends get an RST) and keeps the link up for new ones.
    func reset() { mode.store(Mode.reset.rawValue, ordering: .releasing) }
    /// Stops moving bytes on every connection, without telling either end; new connections are dropped.
    func blackHole() { mode.store(Mode.blackHole.rawValue, ordering: .releasing) }
    /// Moves bytes again (connections that survived the outage carry on).
    func restore() { mode.store(Mode.up.rawValue, ordering: .releasing) }

    /// Ends the relay and closes everything.
    func stop() {
        guard !stopping.exchange(true, ordering: .acquiringAndReleasing) else { return }
        done.wait()
    }

    deinit { stop() }

    private func relay() {
        var pairs: [(Int32, Int32)] = []
        func closeAll(abortive: Bool) {
            for (a, b) in pairs {
                for fd in [a, b] {
                    if abortive {
                        var linger = Glibc.linger(l_onoff: 1, l_linger: 0)
                        setsockopt(fd, SOL_SOCKET, SO_LINGER, &linger, socklen_t(MemoryLayout<Glibc.linger>.size))
                    }
                    close(fd)
                }
            }
            pairs.removeAll()
        }
        var buffer = [UInt8](repeating: 0, count: 256 * 1024)
        while !stopping.load(ordering: .acquiring) {
            let current = Mode(rawValue: mode.load(ordering: .acquiring))!
            if current == .reset {
                closeAll(abortive: true)
                resets.add(1, ordering: .relaxed)
                mode.store(Mode.up.rawValue, ordering: .releasing)
                continue
            }
            var fds = [pollfd(fd: listenFD, events: Int16(POLLIN), revents: 0)]
            let polled = current == .up ? pairs.count : 0
            if current == .up {
                for (a, b) in pairs {
                    fds.append(pollfd(fd: a, events: Int16(POLLIN), revents: 0))
                    fds.append(pollfd(fd: b, events: Int16(POLLIN), revents: 0))
                }
            }
            guard poll(&fds, nfds_t(fds.count), 20) > 0 else { continue }
            if fds[0].revents & Int16(POLLIN) != 0 {
                let client = accept(listenFD, nil, nil)
                if client >= 0 {
                    if current == .up, let upstream = connectTarget() {
                        var one: Int32 = 1
                        for fd in [client, upstream] {
                            setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
                        }
                        pairs.append((client, upstream))
                        accepted.add(1, ordering: .relaxed)
                    } else {
                        close(client)
                    }
                }
            }
            guard current == .up else { continue }
            var dead: Set<Int> = []
            for (index, (a, b)) in pairs.prefix(polled).enumerated() {
                for (from, to, slot) in [(a, b, 1 + 2 * index), (b, a, 2 + 2 * index)]
                where fds[slot].revents & Int16(POLLIN | POLLHUP | POLLERR) != 0 {
                    let n = read(from, &buffer, buffer.count)
                    if n <= 0 || !writeAll(to, buffer, n) { dead.insert(index) }
                }
            }
            for index in dead.sorted(by: >) {
                let (a, b) = pairs.remove(at: index)
                close(a)
                close(b)
            }
        }
        closeAll(abortive: false)
        close(listenFD)
        done.signal()
    }

    private func connectTarget() -> Int32? {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { return nil }
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_addr.s_addr = inet_addr(target.host)
        addr.sin_port = target.port.bigEndian
        let rc = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        guard rc == 0 else {
            close(fd)
            return nil
        }
        return fd
    }

    private func writeAll(_ fd: Int32, _ bytes: [UInt8], _ count: Int) -> Bool {
        var sent = 0
        while sent < count {
            let n = bytes.withUnsafeBytes { write(fd, $0.baseAddress! + sent, count - sent) }
            if n < 0, errno == EINTR { continue }
            guard n > 0 else { return false }
            sent += n
        }
        return true
    }
}

struct CuttableLinkError: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}
