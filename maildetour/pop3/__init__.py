"""maildetour.pop3: the POP3 server for hosted Maildir mailboxes (issue 3, docs/pop3.md).

`protocol` is the sans-I/O state machine (`events` its values), `server` the asyncio wrapper (`start_pop3`),
`wire` the RETR/TOP encoder, `throttle` the failed-login throttle; every limit is in
`config.model.Pop3Settings`.
"""
