"""The durable queue between smtpd and delivery (Postfix's incoming/active/deferred/hold folders).
"""
