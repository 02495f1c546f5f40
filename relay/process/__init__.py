"""The relay as processes: the supervisor (server) and its workers (worker), their options,
sockets and config watching, the command line, the probe, TLS reload, the queue command.
"""
