// Real QEMU guests migrated in each mode on this host. The guest runs the memory tester from
// Workloads/guest (it fills memory with a pattern, keeps mutating it and verifies it every second); each
// migration must keep its counter going with OK on the destination, and in enlightened mode every page
// the destination placed must equal the source's page at STOP.

import EpcopyHostEngine
import EpcopyTestSupport
import Foundation
import Testing

enum GuestFixture {
    static var image: GuestImage? {
        guard Prerequisite.testGuest.isMet, let kernel = Prerequisite.testGuestKernel else { return nil }
        return GuestImage(kernel: kernel, initrd: Prerequisite.testGuestInitrd,
                          append: "console=ttyS0 quiet epcopy.memtest_mib=128 epcopy.seed=11")
    }
    static let preload = URL(fileURLWithPath: "/proc/self/exe").resolvingSymlinksInPath()
        .deletingLastPathComponent().appendingPathComponent("libEpcopyPreload.so").path

    /// Boots a guest and waits until its tester has printed a few OK lines.
    static func bootedGuest(_ name: String, memoryMiB: Int = 512, append: String? = nil) throws -> QEMUProcess {
        var image = try #require(image, Comment(rawValue: Prerequisite.testGuest.reason))
        if let append { image.append = append }
        let vm = try Migration.startVM(name: name, memoryMiB: memoryMiB, image: image, deadlineSeconds: 300)
        if waitUntil(deadline: .seconds(90), poll: .milliseconds(200), {
            (Migration.lastCounterForTests(vm.serialLog) ?? 0) >= 2
        }) {
            return vm
        }
        Issue.record("the guest did not start its memory tester: \(vm.serialLog.suffix(2000))")
        throw MigrationError.failed("guest did not boot")
    }
}

@Suite(.serialized, .tier(.qemu), .requires(.testGuest)) struct MigrationTests {
    @Test(arguments: MigrationMode.allCases)
    func aRunningGuestMigratesAndVerifies(mode: MigrationMode) throws {
        let source = try GuestFixture.bootedGuest("mig-\(mode.rawValue)-\(getpid())")
        let (result, destination) = try Migration.run(source: source, options: MigrationOptions(
            mode: mode, verify: true, preloadLibrary: GuestFixture.preload))
        defer { destination.teardown() }
        print("migration \(mode): \(result)")
        // QEMU's own precopy used to crash this guest about one run in thirteen (a QEMU < 9.0 TCG bug that loses
        // dirty pages); the launcher's 8 KiB of extra RAM under TCG avoids it (QEMUConfig.ramPadKiB).
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

extension MigrationTests {
    /// RAM split around the PCI hole: q35 puts 2 GiB below 4 GiB and the rest above it.
    @Test func aGuestLargerThan3GiBMigratesInEnlightenedMode() throws {
        let source = try GuestFixture.bootedGuest("mig-big-\(getpid())", memoryMiB: 3584)
        let (result, destination) = try Migration.run(source: source, options: MigrationOptions(
            mode: .enlightened, verify: true, preloadLibrary: GuestFixture.preload))
        defer { destination.teardown() }
        print("migration of a 3.5 GiB guest: \(result)")
        #expect(result.guestVerdict == "OK")
        #expect(result.mismatchedPages == 0)
        // Every page is compared except those the guest reported free after resume (placed ones are compared
        // even then); free frames above 4 GiB must map past the PCI hole to be excluded correctly.
        #expect(result.enlightened == true, "\(result.agentNotes ?? [])")
        #expect(result.pagesCompared + (result.pagesReportedFree ?? 0) >= source.config.regionPages)
        #expect(result.pagesCompared > 0)
    }

    @Test func ramOffsetsFollowTheQ35Layout() {
        let big: UInt64 = 3584 * 256
        #expect(Migration.ramOffsetForTests(0x1000, big) == 0x1000)
        #expect(Migration.ramOffsetForTests(0x8000_0000, big) == nil)  // PCI hole
        #expect(Migration.ramOffsetForTests(1 << 32, big) == 0x8000_0000)
        #expect(Migration.ramOffsetForTests((1 << 32) + 0x6000_0000 - 1, big) == 0x8000_0000 + 0x6000_0000 - 1)
        #expect(Migration.ramOffsetForTests((1 << 32) + 0x6000_0000, big) == nil)
        let small: UInt64 = 512 * 256
        #expect(Migration.ramOffsetForTests(0x1FFF_F000, small) == 0x1FFF_F000)
        #expect(Migration.ramOffsetForTests(0x2000_0000, small) == nil)
    }

    /// A destination that cannot start: the migration fails before the switch and the source keeps
    /// running, untouched.
    @Test func aDestinationThatCannotStartLeavesTheSourceRunning() throws {
        let source = try GuestFixture.bootedGuest("mig-fail-\(getpid())")
        defer { source.kill(); source.teardown() }
        var spec = VMSpec(source.config)
        spec.kernel = "/nonexistent/vmlinux"
        for mode in MigrationMode.allCases {
            #expect(throws: (any Error).self) {
                _ = try DestinationSide(spec: spec, name: "mig-fail-dst-\(getpid())", mode: mode, session: 1,
                                        bindHost: "127.0.0.1",
                                        options: MigrationOptions(mode: mode, preloadLibrary: GuestFixture.preload))
            }
        }
        let status = try source.qmp.execute("query-status", timeout: .seconds(5))
        #expect(status["status"]?.stringValue == "running")
        let before = Migration.lastCounterForTests(source.serialLog) ?? 0
        #expect(waitUntil(deadline: .seconds(10), poll: .milliseconds(100)) {
            (Migration.lastCounterForTests(source.serialLog) ?? 0) > before
        }, "the source guest stopped counting")
    }
}

extension MigrationTests {
    /// One VM, one migration per mode in a row: each mode must undo the capabilities the previous one left on
    /// the QEMU it arrived in (QEMU refuses postcopy while x-ignore-shared is on).
    @Test func aVMMigratedOneWayCanLeaveAnyOtherWay() throws {
        var vm = try GuestFixture.bootedGuest("mig-chain-\(getpid())",
                                              append: "console=ttyS0 quiet epcopy.memtest_mib=64 epcopy.seed=3")
        defer { vm.kill(); vm.teardown() }
        for mode in [MigrationMode.enlightened, .postcopy, .enlightened, .precopy, .enlightened] {
            let (result, next) = try Migration.run(source: vm, options: MigrationOptions(
                mode: mode, verify: true, preloadLibrary: GuestFixture.preload, settleSeconds: 2))
            vm = next
            #expect(result.mismatchedPages == 0, "\(mode)")
            #expect(result.guestVerdict == "OK", "\(mode): \(next.serialLog.suffix(300))")
        }
    }
}
