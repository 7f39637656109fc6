"""maildetour.mailbox"""
