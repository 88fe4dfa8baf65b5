"""Bound domains behind one interface. See `verikit.domains.base` for the API."""
from .base import (  # noqa: F401
    FALSIFIED, UNKNOWN, VERIFIED, Domain, DomainResult, available_domains, get_domain, get_domain_class,
    parse_domain_list, register_domain, unregister_domain,
)
