// The engine's NUMA placement is its own target (EpcopyNuma: topology, node choice, binding), so that the placement
// check that runs inside a two-node test guest (epcopy-numa-check) is built from the same code without the engine's
// libraries. Re-exported: to the engine's users it stays part of the engine.

@_exported import EpcopyNuma
