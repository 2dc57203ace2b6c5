// TCP sockets for the engine↔engine channels. Set-up (listen, accept, connect, handshake) is blocking
// with explicit deadlines; once a session runs, the descriptors are driven by io_uring.

import CEpcopyLinux
#if canImport(Glibc)
import Glibc
#endif

/// An IPv4 endpoint "HOST:PORT". Only numeric addresses: the engine never resolves names.
public struct Endpoint: Sendable, Hashable, CustomStringConvertible {
    public var host: String
    public var port: UInt16

    public init(host: String, port: UInt16) {
        self.host = host
        self.port = port
    }

    /// Parses "127.0.0.1:7000"; nil when malformed.
    public init?(_ text: String) {
        guard let colon = text.lastIndex(of: ":"), let port = UInt16(text[text.index(after: colon)...]) else {
            return nil
        }
        let host = String(text[..<colon])
        var addr = in_addr()
        guard inet_pton(AF_INET, host, &addr) == 1 else { return nil }
        self.init(host: host, port: port)
    }

    public var description: String { "\(host):\(port)" }

    func sockaddr() throws(SyscallError) -> sockaddr_in {
        var sa = sockaddr_in()
        sa.sin_family = sa_family_t(AF_INET)
        sa.sin_port = port.bigEndian
        guard inet_pton(AF_INET, host, &sa.sin_addr) == 1 else {
            throw SyscallError(call: "inet_pton(\(host))", errno: EINVAL)
        }
        return sa
    }
}

/// A listening socket and the address it is bound to.
public struct Listener: ~Copyable, Sendable {
    public let descriptor: FileDescriptor
    public let endpoint: Endpoint
}

public enum TCP {
    /// Binds and listens; port 0 picks a free port (see the listener's `endpoint`).
    public static func listen(on endpoint: Endpoint, backlog: Int32 = 16) throws(SyscallError) -> Listener {
        let fd = try FileDescriptor(adopting: Int32(Syscall.check("socket") {
            Syscall.negErrno(Int(socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)))
        }))
        var one: Int32 = 1
        _ = setsockopt(fd.rawValue, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
        var sa = try endpoint.sockaddr()
        let raw = fd.rawValue
        _ = try Syscall.check("bind(\(endpoint))") {
            Syscall.negErrno(Int(withUnsafePointer(to: &sa) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                    bind(raw, $0, socklen_t(MemoryLayout<sockaddr_in>.size))
                }
            }))
        }
        _ = try Syscall.check("listen(\(endpoint))") { Syscall.negErrno(Int(Glibc.listen(raw, backlog))) }
        var bound = sockaddr_in()
        var len = socklen_t(MemoryLayout<sockaddr_in>.size)
        _ = withUnsafeMutablePointer(to: &bound) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(raw, $0, &len) }
        }
        return Listener(descriptor: fd, endpoint: Endpoint(host: endpoint.host, port: UInt16(bigEndian: bound.sin_port)))
    }

    /// Waits up to `timeoutMillis` for a connection.
    public static func accept(_ listener: borrowing Listener, timeoutMillis: Int32) throws(SyscallError)
        -> FileDescriptor
    {
        try waitReadable(listener.descriptor.rawValue, timeoutMillis: timeoutMillis, call: "accept")
        let raw = listener.descriptor.rawValue
        let fd = try Syscall.check("accept") { Int(epc_accept_cloexec(raw)) }
        return FileDescriptor(adopting: Int32(fd))
    }

    /// Connects with a deadline; ECONNREFUSED and ETIMEDOUT come back as errors naming the endpoint.
    public static func connect(to endpoint: Endpoint, timeoutMillis: Int32) throws(SyscallError) -> FileDescriptor {
        let fd = try FileDescriptor(adopting: Int32(Syscall.check("socket") {
            Syscall.negErrno(Int(socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue)
                | Int32(SOCK_NONBLOCK.rawValue), 0)))
        }))
        var sa = try endpoint.sockaddr()
        let raw = fd.rawValue
        let rc = withUnsafePointer(to: &sa) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                Glibc.connect(raw, $0, socklen_t(MemoryLayout<sockaddr_in>.size))
            }
        }
        if rc != 0 {
            guard errno == EINPROGRESS else { throw SyscallError(call: "connect(\(endpoint))", errno: errno) }
            var pfd = pollfd(fd: raw, events: Int16(POLLOUT), revents: 0)
            let n = poll(&pfd, 1, timeoutMillis)
            if n == 0 { throw SyscallError(call: "connect(\(endpoint))", errno: ETIMEDOUT) }
            var soError: Int32 = 0
            var len = socklen_t(MemoryLayout<Int32>.size)
            getsockopt(raw, SOL_SOCKET, SO_ERROR, &soError, &len)
            if soError != 0 { throw SyscallError(call: "connect(\(endpoint))", errno: soError) }
        }
        // Back to blocking: the handshake uses plain blocking I/O with poll deadlines.
        let flags = fcntl(raw, F_GETFL)
        _ = fcntl(raw, F_SETFL, flags & ~O_NONBLOCK)
        return fd
    }

    /// Small messages (faults, acks) must not wait for Nagle.
    public static func setNoDelay(_ fd: Int32) {
        var one: Int32 = 1
        _ = setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
    }

    public static func setBufferSizes(_ fd: Int32, bytes: Int32) {
        var size = bytes
        _ = setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &size, socklen_t(MemoryLayout<Int32>.size))
        _ = setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, socklen_t(MemoryLayout<Int32>.size))
    }

    static func waitReadable(_ fd: Int32, timeoutMillis: Int32, call: String) throws(SyscallError) {
        var pfd = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
        let n = try Syscall.check("poll(\(call))") { Syscall.negErrno(Int(poll(&pfd, 1, timeoutMillis))) }
        if n == 0 { throw SyscallError(call: call, errno: ETIMEDOUT) }
    }

    /// Writes all of `buffer` (blocking).
    public static func sendAll(_ fd: Int32, _ buffer: UnsafeRawBufferPointer) throws(SyscallError) {
        var offset = 0
        while offset < buffer.count {
            let n = try Syscall.check("send") {
                Syscall.negErrno(send(fd, buffer.baseAddress! + offset, buffer.count - offset, Int32(MSG_NOSIGNAL)))
            }
            offset += n
        }
    }

    /// Reads up to `buffer.count` bytes, waiting at most `timeoutMillis`; 0 means the peer closed.
    public static func receive(_ fd: Int32, into buffer: UnsafeMutableRawBufferPointer,
                               timeoutMillis: Int32) throws(SyscallError) -> Int {
        try waitReadable(fd, timeoutMillis: timeoutMillis, call: "recv")
        return try Syscall.check("recv") { Syscall.negErrno(recv(fd, buffer.baseAddress, buffer.count, 0)) }
    }
}

/// Unix stream sockets: QMP and the agent's virtio-serial chardev, both served by QEMU.
public enum UnixStream {
    /// A blocking, close-on-exec socket connected to `path`; sends give up after `sendTimeoutSeconds`.
    public static func connect(_ path: String, sendTimeoutSeconds: Int = 10) throws(SyscallError) -> FileDescriptor {
        var addr = sockaddr_un()
        var length: UInt32 = 0
        _ = try Syscall.check("connect(\(path))") { Int(epc_unix_address(path, &addr, &length)) }
        let raw = try Int32(Syscall.check("socket(AF_UNIX)") {
            Syscall.negErrno(Int(Glibc.socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)))
        })
        let fd = FileDescriptor(adopting: raw)
        _ = try Syscall.check("connect(\(path))") {
            // SAFETY: `addr` is a filled sockaddr_un of `length` bytes, alive for the call.
            Syscall.negErrno(Int(withUnsafePointer(to: &addr) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.connect(raw, $0, socklen_t(length)) }
            }))
        }
        var sendTimeout = timeval(tv_sec: sendTimeoutSeconds, tv_usec: 0)
        _ = setsockopt(raw, SOL_SOCKET, SO_SNDTIMEO, &sendTimeout, socklen_t(MemoryLayout<timeval>.size))
        return fd
    }
}
