// Real QEMU guests migrated in each mode on this host. The guest runs the memory tester from
// Workloads/guest (it fills memory with a pattern, keeps mutating it and verifies it every second); each
// migration must keep its counter going with OK on the destination, and in enlightened mode every page
// the destination placed must equal the source's page at STOP.

import EpcopyHostEngine
import Foundation
import Testing

enum GuestFixture {
    static let directory = URL(fileURLWithPath: #filePath).deletingLastPathComponent()
        .appendingPathComponent("../../Workloads/guest/out").standardized.path
    static var image: GuestImage? {
        let kernel = ["vmlinux", "bzImage"].map { "\(directory)/\($0)" }.first {
            FileManager.default.fileExists(atPath: $0)
        }
        let initrd = "\(directory)/initrd.img"
        guard let kernel, FileManager.default.fileExists(atPath: initrd) else { return nil }
        return GuestImage(kernel: kernel, initrd: initrd,
                          append: "console=ttyS0 quiet epcopy.memtest_mib=128 epcopy.seed=11")
    }
    static let preload = URL(fileURLWithPath: "/proc/self/exe").resolvingSymlinksInPath()
        .deletingLastPathComponent().appendingPathComponent("libEpcopyPreload.so").path

    /// Boots a guest and waits until its tester has printed a few OK lines.
    static func bootedGuest(_ name: String, memoryMiB: Int = 512) throws -> QEMUProcess {
        let image = try #require(image, "the test guest is not built: run `make guest`")
        let vm = try Migration.startVM(name: name, memoryMiB: memoryMiB, image: image, deadlineSeconds: 300)
        let deadline = Date().addingTimeInterval(90)
        while Date() < deadline {
            if let n = Migration.lastCounterForTests(vm.serialLog), n >= 2 { return vm }
            usleep(200_000)
        }
        Issue.record("the guest did not start its memory tester: \(vm.serialLog.suffix(2000))")
        throw MigrationError.failed("guest did not boot")
    }
}

@Suite(.serialized) struct MigrationTests {
    @Test(arguments: MigrationMode.allCases)
    func aRunningGuestMigratesAndVerifies(mode: MigrationMode) throws {
        let source = try GuestFixture.bootedGuest("mig-\(mode.rawValue)-\(getpid())")
        let (result, destination) = try Migration.run(source: source, options: MigrationOptions(
            mode: mode, verify: true, preloadLibrary: GuestFixture.preload))
        defer { destination.teardown() }
        print("migration \(mode): \(result)")
        #expect(result.guestVerdict == "OK", "guest: \(destination.serialLog.suffix(500))")
        #expect(result.mismatchedPages == 0)
        if mode == .enlightened {
            #expect(result.pagesCompared > 0)
            #expect(result.faultsBeforeResume <= 8, "device-state load faults: \(result.faultsBeforeResume)")
        }
        #expect(!source.isRunning)
        #expect(!FileManager.default.fileExists(atPath: source.config.ramFile), "source RAM file left behind")
    }
}
