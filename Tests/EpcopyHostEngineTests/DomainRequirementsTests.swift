// DomainRequirements: `epcopy libvirt check` finds, item by item, what a domain definition lacks for an
// enlightened migration, and `prepare`'s edits provide exactly that and keep everything else of the definition
// (devices, secrets, other QEMU arguments). A definition no edit can fix is said to be so.

import EpcopyHostEngine
import EpcopyTestSupport
import Foundation
import Testing

@Suite(.tier(.unit)) struct DomainRequirementsTests {
    static let uuid = "5d0b6a3e-9c1f-4b7a-8e2d-1f3c5a7b9d0e"
    let requirements = DomainRequirements(memoryBackingDirectory: "/var/lib/libvirt/qemu/ram/",
                                          shimLibrary: "/opt/epcopy/libEpcopyPreload.so")

    static func domain(memoryBacking: String = "", cpu: String = "", devices: String = "", extra: String = "") -> String {
        """
        <domain type='qemu'>
          <name>web-1</name>
          <uuid>\(uuid)</uuid>
          <memory unit='KiB'>524288</memory>
          \(memoryBacking)
          <vcpu>1</vcpu>
          <os><type arch='x86_64' machine='pc'>hvm</type><kernel>/boot/vmlinuz</kernel></os>
          \(cpu)
          <devices>
            <emulator>/usr/bin/qemu-system-x86_64</emulator>
            <graphics type='vnc' port='-1' passwd='s3cret'/>
            \(devices)
          </devices>
          \(extra)
        </domain>
        """
    }

    private func item(_ check: DomainCheck, _ name: String) -> DomainCheckItem? { check.items.first { $0.name == name } }

    @Test func aPlainDomainLacksEachItemAndPrepareAddsThemAll() throws {
        let before = try requirements.check(xml: Self.domain())
        #expect(!before.migratable)
        #expect(before.domain == "web-1")
        for name in ["memory in a shared file", "epcopy's monitor", "destination shim"] {
            let found = try #require(item(before, name), "\(name)")
            #expect(!found.ok && found.required && found.fix != nil, "\(found)")
        }
        #expect(item(before, "guest agent channel")?.required == false)
        #expect(item(before, "guest agent channel")?.ok == false)
        #expect(item(before, "memory in a shared file")?.fix?.contains("<access mode='shared'/>") == true)

        let prepared = try requirements.prepare(xml: Self.domain())
        #expect(prepared.added == ["memory in a shared file", "epcopy's monitor", "destination shim", "guest agent channel"])
        let after = try requirements.check(xml: prepared.xml)
        #expect(after.migratable, "\(after.items.filter { !$0.ok })")
        #expect(after.items.allSatisfy { $0.ok }, "\(after.items.filter { !$0.ok })")
        // Everything else of the definition is kept: the secret, the emulator, the kernel.
        #expect(prepared.xml.contains("s3cret"))
        #expect(prepared.xml.contains("/usr/bin/qemu-system-x86_64"))
        #expect(prepared.xml.contains("/boot/vmlinuz"))
        // The monitor and the shim's sockets are named by the UUID (the same path on both hosts).
        #expect(prepared.xml.contains("unix:/run/libvirt/qemu/epcopy-\(Self.uuid).qmp,server=on,wait=off"))
        #expect(prepared.xml.contains("/run/libvirt/qemu/epcopy-\(Self.uuid).shim"))
        // A second prepare has nothing to add.
        #expect(try requirements.prepare(xml: prepared.xml).added.isEmpty)
    }

    @Test func anExistingShimEnvironmentThatDiffersIsReplacedAndOtherArgumentsStay() throws {
        let extra = """
            <qemu:commandline xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
              <qemu:arg value='-no-hpet'/>
              <qemu:env name='LD_PRELOAD' value='/old/libEpcopyPreload.so'/>
            </qemu:commandline>
            """
        let text = Self.domain(memoryBacking: "<memoryBacking><source type='file'/><access mode='shared'/></memoryBacking>", extra: extra)
        let before = try requirements.check(xml: text)
        #expect(item(before, "memory in a shared file")?.ok == true)
        #expect(item(before, "destination shim")?.found.contains("LD_PRELOAD (has /old/libEpcopyPreload.so)") == true,
                "\(String(describing: item(before, "destination shim")))")
        let prepared = try requirements.prepare(xml: text)
        #expect(!prepared.added.contains("memory in a shared file"))
        #expect(try requirements.check(xml: prepared.xml).migratable)
        #expect(prepared.xml.contains("-no-hpet"))
        #expect(!prepared.xml.contains("/old/libEpcopyPreload.so"))
    }

    @Test func hugepagesAndGuestNUMACellsAreRefusedWithNoEdit() throws {
        let huge = Self.domain(memoryBacking: "<memoryBacking><hugepages/></memoryBacking>")
        let hugeCheck = try requirements.check(xml: try requirements.prepare(xml: huge).xml)
        #expect(!hugeCheck.migratable)
        #expect(item(hugeCheck, "4 KiB pages")?.ok == false && item(hugeCheck, "4 KiB pages")?.fix == nil)
        let numa = Self.domain(cpu: "<cpu><numa><cell id='0' cpus='0' memory='262144' unit='KiB'/><cell id='1' cpus='1' memory='262144' unit='KiB'/></numa></cpu>")
        let numaCheck = try requirements.check(xml: try requirements.prepare(xml: numa).xml)
        #expect(!numaCheck.migratable)
        #expect(item(numaCheck, "one RAM region")?.found == "2 guest NUMA cells, 0 memory devices")
    }

    @Test func whatIsNotADomainIsRefusedByName() throws {
        let cases: [(xml: String, says: String, prepare: Bool)] = [
            ("<domain><name>x", "does not parse", false),
            ("<network><name>x</name></network>", "not a domain", false),
            ("<domain type='qemu'><name>x</name></domain>", "no <uuid>", true),
        ]
        for (xml, says, prepare) in cases {
            do {
                if prepare { _ = try requirements.prepare(xml: xml) } else { _ = try requirements.check(xml: xml) }
                Issue.record("accepted: \(xml)")
            } catch { #expect("\(error)".contains(says), "\(xml) → \(error)") }
        }
    }

    @Test func theJSONReportSaysWhetherTheDomainIsMigratable() throws {
        let check = try requirements.check(xml: Self.domain())
        let object = try JSONSerialization.jsonObject(with: JSONEncoder().encode(check)) as? [String: Any]
        #expect(object?["migratable"] as? Bool == false)
        #expect((object?["items"] as? [Any])?.count == check.items.count)
    }
}
