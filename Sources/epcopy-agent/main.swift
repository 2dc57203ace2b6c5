// The in-guest agent as a static binary (no Swift runtime to install in the guest). All of it lives in the
// EpcopyGuestAgent module; `epcopy agent` on a host runs the same code.

#if canImport(Glibc)
import Glibc
#endif
import EpcopyGuestAgent

exit(AgentCommand.main(arguments: Array(CommandLine.arguments.dropFirst())))
