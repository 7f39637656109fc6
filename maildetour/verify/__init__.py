"""maildetour.verify: SPF, DKIM and DMARC verdicts of received mail, and the DNS lookups they make."""
