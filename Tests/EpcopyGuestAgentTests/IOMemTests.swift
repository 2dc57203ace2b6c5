// /proc/iomem parsing: a q35 guest above 4 GiB, partial pages, hidden addresses, garbage.

import EpcopyGuestAgent
import EpcopyProtocol
import EpcopyTestSupport
import Foundation
import Testing

@Suite(.tier(.unit)) struct IOMemTests {
    static let q35 = """
        00000000-00000fff : Reserved
        00001000-0009fbff : System RAM
        0009fc00-0009ffff : Reserved
        000f0000-000fffff : System ROM
        00100000-bffdffff : System RAM
          01000000-01ffffff : Kernel code
        bffe0000-bfffffff : Reserved
        100000000-13fffffff : System RAM
        fd000000-fdffffff : PCI Bus 0000:00
        """

    @Test func systemRAMSkipsHolesAndPartialPages() throws {
        let frames = try IOMem.systemRAM(Self.q35)
        // 0x1000..0x9fbff: frames 1...0x9e (0x9f000-0x9fbff is a partial page).
        #expect(frames.contains(GuestFrameNumber(rawValue: 1)))
        #expect(frames.contains(GuestFrameNumber(rawValue: 0x9e)))
        #expect(!frames.contains(GuestFrameNumber(rawValue: 0x9f)))
        #expect(!frames.contains(GuestFrameNumber(rawValue: 0)))
        #expect(frames.contains(GuestFrameNumber(rawValue: 0x100)))
        #expect(frames.contains(GuestFrameNumber(rawValue: 0xbffdf)))
        #expect(!frames.contains(GuestFrameNumber(rawValue: 0xbffe0)))
        // Above the PCI hole: 4 GiB ... 5 GiB.
        #expect(frames.contains(GuestFrameNumber(rawValue: 0x100000)))
        #expect(frames.contains(GuestFrameNumber(rawValue: 0x13ffff)))
        #expect(!frames.contains(GuestFrameNumber(rawValue: 0x140000)))
        #expect(frames.rangeCount == 3)
        #expect(frames.count == 0x9e + (0xbffe0 - 0x100) + 0x40000)
    }

    @Test func nestedSystemRAMLinesAreNotCountedTwice() throws {
        let text = "00100000-001fffff : System RAM\n  00100000-001fffff : System RAM\n"
        #expect(try IOMem.systemRAM(text).count == 0x100)
    }

    @Test func hiddenAddressesAreAnError() {
        #expect(throws: IOMemError.addressesHidden) {
            try IOMem.systemRAM("00000000-00000000 : System RAM\n00000000-00000000 : Reserved\n")
        }
    }

    @Test func malformedLinesNameTheLine() {
        #expect(throws: IOMemError.malformedLine(number: 2, text: "zzzz")) {
            try IOMem.parse("00000000-00000fff : Reserved\nzzzz\n")
        }
        #expect(throws: IOMemError.malformedLine(number: 1, text: "2000-1000 : System RAM")) {
            try IOMem.parse("2000-1000 : System RAM")
        }
        #expect(throws: IOMemError.noSystemRAM) { try IOMem.systemRAM("00000000-00000fff : Reserved\n") }
    }

    @Test func thisHostsIOMemParses() throws {
        let text = try String(contentsOfFile: "/proc/iomem", encoding: .utf8)
        let frames = try IOMem.systemRAM(text)
        #expect(frames.count > 0)
    }
}
