"""The SMTP server stage, like Postfix's postscreen + smtpd: connection screening, the protocol,
the restrictions at each stage, content checks at end of DATA.
"""
