"""Delivery to next hops, like Postfix's qmgr + smtp: the scheduler loop (qmgr), next-hop
lookup (nexthop), connections and their pool (connections), one SMTP transaction engine
(transaction, reading replies with replies), bounces (dsn).
"""
