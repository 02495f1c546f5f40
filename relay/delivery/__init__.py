"""Delivery to next hops, like Postfix's qmgr + smtp: the scheduler loop, next-hop lookup, the
SMTP client, bounces.
"""
