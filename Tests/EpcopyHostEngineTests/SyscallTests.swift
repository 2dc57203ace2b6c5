// The syscall layer's contract: EINTR is retried, EAGAIN is a value, other errnos become errors that
// name the call, EBADF/EFAULT trap. Real failing calls check the errno mapping end to end.

import CEpcopyLinux
@testable import EpcopyHostEngine
import EpcopyTestSupport
import Glibc
import Testing

@Suite(.tier(.linux)) struct SyscallLayerTests {
    @Test func retriesEINTRUntilTheCallCompletes() throws {
        var attempts = 0
        let rc = try Syscall.check("fake") { () -> Int in
            attempts += 1
            return attempts < 4 ? -Int(EINTR) : 42
        }
        #expect(rc == 42)
        #expect(attempts == 4)
    }

    @Test func returnsEAGAINAsAValue() throws {
        let outcome = try Syscall.run("fake") { -Int(EAGAIN) }
        #expect(outcome == .wouldBlock)
        #expect(throws: SyscallError(call: "fake", errno: EAGAIN)) { try Syscall.check("fake") { -Int(EAGAIN) } }
    }

    @Test func throwsOtherErrnosNamingTheCall() {
        #expect(throws: SyscallError(call: "UFFDIO_REGISTER", errno: EINVAL)) {
            try Syscall.check("UFFDIO_REGISTER") { -Int(EINVAL) }
        }
        let error = SyscallError(call: "UFFDIO_REGISTER", errno: EINVAL)
        #expect(error.description == "UFFDIO_REGISTER: EINVAL (Invalid argument)")
        #expect(SyscallError(call: "x", errno: 9999).errnoName == "errno 9999")
    }

    @Test func realOpenOfAMissingFileReportsENOENT() {
        #expect(throws: SyscallError(call: "open(/nonexistent/epcopy)", errno: ENOENT)) {
            _ = try FileDescriptor.open("/nonexistent/epcopy", O_RDONLY)
        }
    }

    @Test func realIoctlOnTheWrongKindOfFileReportsENOTTY() throws {
        let file = try FileDescriptor.open("/dev/null", O_RDWR)
        let fd = file.rawValue
        #expect(throws: SyscallError(call: "UFFDIO_API", errno: ENOTTY)) {
            _ = try Syscall.check("UFFDIO_API") { epc_uffd_api(fd, 0, nil, nil) }
        }
    }

    @Test func badDescriptorIsAProgrammingErrorAndTraps() async {
        await #expect(processExitsWith: .failure) {
            _ = try? Syscall.check("read") { Syscall.negErrno(Glibc.read(-1, nil, 0)) }
        }
    }

    @Test func readOnAnEmptyNonBlockingDescriptorWouldBlock() throws {
        var fds: [Int32] = [0, 0]
        #expect(pipe2(&fds, O_NONBLOCK | O_CLOEXEC) == 0)
        let reader = FileDescriptor(adopting: fds[0])
        let writer = FileDescriptor(adopting: fds[1])
        var byte: UInt8 = 0
        let empty = try withUnsafeMutableBytes(of: &byte) { try reader.read(into: $0) }
        #expect(empty == .wouldBlock)
        let wrote = try withUnsafeBytes(of: UInt8(7)) { try writer.write($0) }
        #expect(wrote == .done(1))
        let got = try withUnsafeMutableBytes(of: &byte) { try reader.read(into: $0) }
        #expect(got == .done(1))
        #expect(byte == 7)
    }

    @Test func punchHoleReturnsZerosAndFreesTheRange() throws {
        let size = 1 << 20
        let file = try FileDescriptor.memfd(name: "epcopy-test")
        try file.truncate(to: UInt64(size))
        let map = try MemoryMapping(file: file, length: size)
        map.pointer.initializeMemory(as: UInt8.self, repeating: 0xA5, count: size)
        try file.punchHole(offset: 4096, length: 8192)
        let bytes = UnsafeRawBufferPointer(start: map.pointer, count: size)
        #expect(bytes[4095] == 0xA5)
        #expect(bytes[4096..<12288].allSatisfy { $0 == 0 })
        #expect(bytes[12288] == 0xA5)
    }
}

@Suite(.tier(.linux)) struct UserfaultfdTests {
    @Test func handshakeAndShmemRegistrationWork() throws {
        let available = try Userfaultfd.availableFeatures()
        #expect(available.contains(.missingShmem), "this kernel cannot register shmem in MISSING mode")
        let size = 2 << 20
        let file = try FileDescriptor.memfd(name: "epcopy-test")
        try file.truncate(to: UInt64(size))
        let map = try MemoryMapping(file: file, length: size)
        let uffd = try Userfaultfd(features: [.missingShmem, .eventRemove])
        #expect(uffd.features.contains([.missingShmem, .eventRemove]))
        let ioctls = try uffd.register(start: map.address, length: size, mode: .missing)
        #expect(ioctls.contains([.copy, .zeropage, .wake]))
        try uffd.unregister(start: map.address, length: size)
    }

    @Test func misalignedRegistrationIsEINVALNamingTheIoctl() throws {
        let size = 2 << 20
        let file = try FileDescriptor.memfd(name: "epcopy-test")
        try file.truncate(to: UInt64(size))
        let map = try MemoryMapping(file: file, length: size)
        let uffd = try Userfaultfd(features: [.missingShmem])
        #expect(throws: SyscallError(call: "UFFDIO_REGISTER", errno: EINVAL)) {
            _ = try uffd.register(start: map.address + 1, length: 4096, mode: .missing)
        }
    }

    @Test func bothOpenPathsWorkHere() throws {
        _ = try Userfaultfd(path: .syscall)
        _ = try Userfaultfd(path: .device)
    }
}

@Suite(.tier(.linux)) struct HostProbeTests {
    @Test func probeFindsUserfaultfdAndIoUringOnThisHost() {
        let report = HostProbe.run()
        #expect(report.userfaultfd, "\(report.userfaultfdDevice) \(report.userfaultfdSyscall)")
        #expect(report.shmemMissing, "\(report.shmemMissingError ?? "")")
        #expect(report.ioUring, "\(report.ioUringError ?? "")")
        #expect(report.ioUringOpcodes.contains("SEND") && report.ioUringOpcodes.contains("RECV"))
        #expect(report.uffdFeatures["missing_shmem"] == true)
        #expect(report.numaNodes >= 1)
        #expect(!report.kernel.isEmpty)
    }

    @Test func accelIsTCGUnlessKVMIsDeclared() {
        #expect(HostProbe.chooseAccel(qemuPresent: true, kvmDevice: true, environment: [:]).0 == "tcg")
        #expect(HostProbe.chooseAccel(qemuPresent: true, kvmDevice: true, environment: ["EPCOPY_ACCEL": "kvm"]).0
            == "kvm")
        #expect(HostProbe.chooseAccel(qemuPresent: true, kvmDevice: false, environment: ["EPCOPY_ACCEL": "kvm"]).0
            == "tcg")
        #expect(HostProbe.chooseAccel(qemuPresent: false, kvmDevice: true, environment: [:]).0 == "none")
    }

    @Test func hardwareCRC32CMatchesTheStandardVector() {
        let bytes = Array("123456789".utf8)
        let crc = bytes.withUnsafeBytes { epc_crc32c_hw(0, $0.baseAddress, $0.count) }
        #expect(crc == 0xE306_9283)
    }
}
