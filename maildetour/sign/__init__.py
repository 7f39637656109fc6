"""maildetour.sign: what a forwarded copy carries out: SRS envelope sender, DKIM signature, ARC seal."""
