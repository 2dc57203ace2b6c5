// How `epcopy migrate` shows a migration to a person: the result as one table row, what the guest agent
// contributed in words, and a progress bar while it runs. (`--json` prints MigrationResult itself.)

import EpcopyHostEngine
import Foundation

enum MigrationTable {
    static let header = "mode         downtime_ms  t_release_ms  bytes_wire   faults  before_resume  compared  mismatched  guest"
    static func row(_ r: MigrationResult) -> String {
        String(format: "%-12@ %11.1f  %12.1f  %10.0f  %7.0f  %13.0f  %8.0f  %10.0f  %@",
               r.mode.rawValue as NSString, r.downtimeMillis, r.tReleaseMillis, Double(r.bytesWire), Double(r.faults),
               Double(r.faultsBeforeResume), Double(r.pagesCompared), Double(r.mismatchedPages),
               r.guestVerdict as NSString)
    }

    /// What the guest agent contributed, in words (enlightened mode only).
    static func agentLine(_ r: MigrationResult) -> String? {
        guard r.mode == .enlightened, let enlightened = r.enlightened else { return nil }
        let notes = (r.agentNotes ?? []).joined(separator: "; ")
        guard enlightened else {
            return "no guest agent answered: plain external post-copy with neighbour prefetch"
                + (notes.isEmpty ? "" : " (\(notes))")
        }
        var parts: [String] = []
        if let age = r.agentReportAgeMillis {
            parts.append(String(format: "hot report kept in the background (%.1f s old)", age / 1000))
        } else if let ms = r.agentReportMillis {
            parts.append(String(format: "hot report %.1f ms", ms))
        }
        if let classes = r.pagesByClass {
            let order = ["device", "kernel", "recent", "in_use", "believed_free", "unclassified"]
            parts.append("pushed " + order.compactMap { k in classes[k].map { "\(k) \($0)" } }.joined(separator: ", "))
        }
        if let free = r.pagesReportedFree, let ms = r.freeScanMillis {
            parts.append(String(format: "free scan %.1f ms: %d pages free", ms, Int(free)))
        }
        if let skipped = r.pagesSkippedFree { parts.append("\(skipped) never sent") }
        if !notes.isEmpty { parts.append("notes: \(notes)") }
        return "guest agent: " + parts.joined(separator: "; ")
    }

    /// What the link between the engines went through (only when it was lost at least once).
    static func linkLine(_ r: MigrationResult) -> String? {
        guard let losses = r.linkLosses, losses > 0 else { return nil }
        return String(format: "link: lost %d time%@ after the switch, %@; paused %.1f s in all", losses,
                      (losses == 1 ? "" : "s") as NSString,
                      (r.recovered == true ? "recovered by itself" : "not recovered") as NSString,
                      (r.pausedMillis ?? 0) / 1000)
    }

    /// A libvirt domain's migration: what each host's libvirt says of the domain now.
    static func libvirtLine(_ r: MigrationResult) -> String? {
        guard let version = r.libvirtVersion else { return nil }
        return "libvirt \(version): the source says \(r.sourceState ?? "?"), the destination \(r.destinationState ?? "?")"
    }
}

/// One line, redrawn in place: how much of the VM's memory has moved.
enum ProgressBar {
    static func draw(_ progress: MigrationProgress, label: String) {
        let moved = Double(progress.bytesMoved)
        let total = max(Double(progress.bytesTotal), 1)
        let fraction = min(moved / total, 1)
        let width = 30
        let filled = Int(fraction * Double(width))
        let bar = String(repeating: "#", count: filled) + String(repeating: ".", count: width - filled)
        var text = String(format: "\r%@ [%@] %3.0f%%  %.0f / %.0f MiB", label, bar, fraction * 100,
                          moved / 1_048_576, total / 1_048_576)
        if let down = progress.linkDownMillis {
            text += String(format: "  link lost %.1f s, reconnecting", down / 1000)
        } else if progress.linkLosses > 0 {
            text += "  link recovered" + (progress.linkLosses > 1 ? " (\(progress.linkLosses) losses)" : "")
        }
        // Clear what a longer line before this one left behind.
        text += "\u{1B}[K"
        FileHandle.standardOutput.write(Data(text.utf8))
    }
}
