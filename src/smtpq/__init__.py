"""smtpq: the queue service of a mail transfer agent, on asyncio."""
