"""Actor processes: worker actors (asyncio) and process-isolated actors, run by the supervisor."""
