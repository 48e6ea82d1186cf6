"""A tiny authoritative DNS server on loopback, over UDP and TCP, for the MX relay tests.

Answers from a dict of records built with dnspython's message and rrset objects; names can be
made to answer NXDOMAIN, SERVFAIL, nothing at all (a timeout), or a truncated UDP answer (so
that the resolver retries over TCP).
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections import Counter
from dataclasses import dataclass, field
from typing import cast

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset


@dataclass
class Zone:
    """What the server knows. Names are lower case, without the final dot."""

    #: name -> [(type, rdata text)], e.g. "example.test": [("MX", "10 mx1.example.test.")].
    records: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    servfail: set[str] = field(default_factory=set)
    #: Never answered.
    silent: set[str] = field(default_factory=set)
    #: Answered over UDP with TC set and no records; the full answer only over TCP.
    truncate: set[str] = field(default_factory=set)

    def add(self, name: str, rdtype: str, *rdatas: str) -> None:
        self.records.setdefault(name, []).extend((rdtype, r) for r in rdatas)


class DnsServer:
    """Serves a :class:`Zone` on ``127.0.0.1``, the same port for UDP and TCP."""

    def __init__(self, zone: Zone) -> None:
        self.zone = zone
        self.port = 0
        #: (name, type, "udp"|"tcp") -> count of queries.
        self.queries: Counter[tuple[str, str, str]] = Counter()
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None

    def answer(self, wire: bytes, transport: str) -> bytes | None:
        query = dns.message.from_wire(wire)
        question = query.question[0]
        name = question.name.to_text(omit_final_dot=True).lower()
        rdtype = dns.rdatatype.to_text(question.rdtype)
        self.queries[(name, rdtype, transport)] += 1
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        zone = self.zone
        if name in zone.silent:
            return None
        if name in zone.servfail:
            response.set_rcode(dns.rcode.SERVFAIL)
        elif name not in zone.records:
            response.set_rcode(dns.rcode.NXDOMAIN)
        elif name in zone.truncate and transport == "udp":
            response.flags |= dns.flags.TC
        else:
            rdatas = [text for kind, text in zone.records[name] if kind == rdtype]
            if rdatas:
                response.answer.append(
                    dns.rrset.from_text(question.name, 60, dns.rdataclass.IN, rdtype, *rdatas)
                )
        return response.to_wire()

    async def start(self) -> DnsServer:
        loop = asyncio.get_running_loop()
        server = self

        class Udp(asyncio.DatagramProtocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                # Python 3.11's selector datagram transport does not subclass DatagramTransport.
                self.transport = cast(asyncio.DatagramTransport, transport)

            def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
                reply = server.answer(data, "udp")
                if reply is not None:
                    self.transport.sendto(reply, addr)

        # Find a port free for both UDP and TCP: bind UDP anywhere, then TCP on that port.
        for _ in range(20):
            udp, _ = await loop.create_datagram_endpoint(Udp, local_addr=("127.0.0.1", 0))
            port = udp.get_extra_info("sockname")[1]
            try:
                self._tcp = await asyncio.start_server(self._tcp_client, "127.0.0.1", port)
            except OSError:
                udp.close()
                continue
            self._udp, self.port = udp, port
            return self
        raise RuntimeError("no port free for both UDP and TCP")

    async def _tcp_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                (length,) = struct.unpack("!H", await reader.readexactly(2))
                reply = self.answer(await reader.readexactly(length), "tcp")
                if reply is not None:
                    writer.write(struct.pack("!H", len(reply)) + reply)
                    await writer.drain()
        writer.close()

    async def stop(self) -> None:
        if self._udp is not None:
            self._udp.close()
        if self._tcp is not None:
            self._tcp.close()
            await self._tcp.wait_closed()
