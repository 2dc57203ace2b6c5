// What both sides ask of QEMU's own migration machinery over QMP, in one place so that source and
// destination cannot disagree: the capabilities a mode depends on, and the bytes QEMU's stream carried.

import EpcopyProtocol

enum QEMUMigration {
    /// Every capability a mode depends on, set both ways: a QEMU that arrived by one mode keeps that mode's
    /// capabilities (x-ignore-shared stays on after an enlightened migration, and QEMU refuses postcopy with it).
    static func capabilities(for mode: MigrationMode) -> [String: Bool] {
        ["x-ignore-shared": mode == .enlightened, "postcopy-ram": mode == .postcopy, "events": true]
    }

    /// `migrate-set-capabilities` with `capabilities(for: mode)`.
    static func setCapabilities(_ qmp: QMPClient, for mode: MigrationMode) throws {
        let list = capabilities(for: mode).map {
            QMPValue.object(["capability": .string($0.key), "state": .bool($0.value)])
        }
        do { _ = try qmp.execute("migrate-set-capabilities", arguments: ["capabilities": .array(list)], timeout: .seconds(10)) }
        catch { throw MigrationError.step("migrate-set-capabilities", error) }
    }

    /// x-ignore-shared alone, on or off: a QEMU that libvirt owns keeps the capabilities libvirt sets, and must not
    /// keep this one after an enlightened migration (libvirt's own migrations would then skip its RAM).
    static func setIgnoreShared(_ qmp: QMPClient, _ on: Bool) throws {
        let list: [QMPValue] = [.object(["capability": .string("x-ignore-shared"), "state": .bool(on)])]
        do { _ = try qmp.execute("migrate-set-capabilities", arguments: ["capabilities": .array(list)], timeout: .seconds(10)) }
        catch { throw MigrationError.step("migrate-set-capabilities x-ignore-shared=\(on)", error) }
    }

    /// Bytes QEMU's own migration stream carried (device state, or all of RAM in its own modes).
    static func streamBytes(_ qmp: QMPClient) -> UInt64 {
        guard let info = try? qmp.execute("query-migrate", timeout: .seconds(5)) else { return 0 }
        return UInt64(info["ram"]?["transferred"]?.intValue ?? 0)
    }
}
