"""The SMTP server stage, like Postfix's postscreen + smtpd: connection screening, the protocol,
the restrictions at each stage, content checks at end of DATA.

  server       RelaySMTP: greeting, command loop, HELO/EHLO, STARTTLS, QUIT ...
  transaction  MAIL, RCPT, DATA (streamed to the queue), RSET
  connection   one connection below SMTP: stream callbacks, idle timer, replies
  context      ServerContext: what the connections of a process share
  aiosmtpd_adapter  every private aiosmtpd/asyncio access, and why
  policy       the restriction table of each stage (CONNECT .. END-OF-DATA)
  session      Session, Transaction, Reply, ScreenResult: what the stages share
  proxy, anvil (+ anvil_shared), screen (postscreen), dnsbl, dnschecks, spf, content,
  addresses, smtpdata  the parts the stages use
  milter, milters, milteredit, miltersession  the milter client (smtpd_milters): the
               wire protocol, the chain of one session, edits, what the protocol calls
"""
