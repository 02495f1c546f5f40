"""Queue handover between relay pods on scale-down: the authenticated transfer protocol, the
drain, the control port.
"""
