"""The relay as processes: the supervisor and its workers, the command line, the probe, TLS
reload, the queue command.
"""
