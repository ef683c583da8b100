"""Wire adapters, one per protocol family: parse client input into hub calls and render hub
events in the protocol's own dialect.  No Redis and no business rules here."""
