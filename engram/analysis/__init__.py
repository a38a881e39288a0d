"""What the memory learned: gate values over text (more analysis tools build on these)."""

from engram.analysis.gates import GateReading, gate_values, record_gates

__all__ = ["GateReading", "gate_values", "record_gates"]
