// The agent's whole view of the guest is a handful of kernel files (/proc/iomem, /proc/kpageflags,
// /sys/kernel/mm/page_idle/bitmap, /sys/class/virtio-ports) and one character device. These wrappers are
// all the syscalls it makes: the agent is a static binary without Foundation, so it talks to Glibc
// directly, retries EINTR, and turns every other failure into an error that names the file and errno.

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// A failed file operation: which call, on which path, and the errno.
public struct GuestFileError: Error, Equatable, CustomStringConvertible {
    public var call: String
    public var path: String
    public var errno: Int32

    public init(call: String, path: String, errno: Int32) {
        self.call = call
        self.path = path
        self.errno = errno
    }

    public var description: String {
        let text = strerror(errno).map { String(cString: $0) } ?? "errno \(errno)"
        return "\(call) \(path): \(text)"
    }
}

/// An open file, closed exactly once.
public struct GuestFile: ~Copyable {
    public let fd: Int32
    public let path: String

    public init(path: String, flags: Int32) throws(GuestFileError) {
        var fd: Int32
        repeat { fd = open(path, flags | O_CLOEXEC) } while fd < 0 && errno == EINTR
        guard fd >= 0 else { throw GuestFileError(call: "open", path: path, errno: errno) }
        self.fd = fd
        self.path = path
    }

    deinit { close(fd) }

    /// Reads up to `count` bytes at `offset` into `buffer`; returns the bytes read (0 at end of file).
    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(GuestFileError) -> Int {
        var done = 0
        while done < buffer.count {
            let n = pread(fd, buffer.baseAddress! + done, buffer.count - done, off_t(Int64(bitPattern: offset + UInt64(done))))
            if n < 0 {
                if errno == EINTR { continue }
                throw GuestFileError(call: "pread", path: path, errno: errno)
            }
            if n == 0 { break }
            done += n
        }
        return done
    }

    /// Writes all of `bytes` at `offset`.
    public func write(_ bytes: UnsafeRawBufferPointer, at offset: UInt64) throws(GuestFileError) {
        var done = 0
        while done < bytes.count {
            let n = pwrite(fd, bytes.baseAddress! + done, bytes.count - done, off_t(Int64(bitPattern: offset + UInt64(done))))
            if n < 0 {
                if errno == EINTR { continue }
                throw GuestFileError(call: "pwrite", path: path, errno: errno)
            }
            done += n
        }
    }
}

public enum GuestFiles {
    /// The whole of a (small, usually virtual) file as text. /proc files report size 0, so read until EOF.
    public static func readText(_ path: String, limit: Int = 4 << 20) throws(GuestFileError) -> String {
        let file = try GuestFile(path: path, flags: O_RDONLY)
        var bytes: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 65536)
        while bytes.count < limit {
            var n = 0
            repeat { n = Glibc.read(file.fd, &chunk, chunk.count) } while n < 0 && errno == EINTR
            if n < 0 { throw GuestFileError(call: "read", path: path, errno: errno) }
            if n == 0 { break }
            bytes.append(contentsOf: chunk[..<n])
        }
        return String(decoding: bytes, as: UTF8.self)
    }

    public static func exists(_ path: String) -> Bool { access(path, F_OK) == 0 }

    /// Names in a directory (without "." and ".."), or [] if it cannot be read.
    public static func list(_ directory: String) -> [String] {
        guard let dir = opendir(directory) else { return [] }
        defer { closedir(dir) }
        var names: [String] = []
        while let entry = readdir(dir) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { raw in
                String(cString: raw.bindMemory(to: CChar.self).baseAddress!)
            }
            if name != "." && name != ".." { names.append(name) }
        }
        return names.sorted()
    }

    /// Monotonic time in nanoseconds.
    public static func monotonicNanos() -> UInt64 {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
    }

    /// CPU seconds this process has used (user + system) and its peak resident set in KiB.
    public static func selfUsage() -> (cpuSeconds: Double, maxRSSKiB: Int) {
        var usage = rusage()
        getrusage(__rusage_who_t(RUSAGE_SELF.rawValue), &usage)
        let cpu = Double(usage.ru_utime.tv_sec) + Double(usage.ru_utime.tv_usec) / 1e6
            + Double(usage.ru_stime.tv_sec) + Double(usage.ru_stime.tv_usec) / 1e6
        return (cpu, Int(usage.ru_maxrss))
    }

    /// `uname -r`.
    public static func kernelRelease() -> String {
        var names = utsname()
        uname(&names)
        return withUnsafeBytes(of: names.release) { raw in
            String(cString: raw.bindMemory(to: CChar.self).baseAddress!)
        }
    }
}
