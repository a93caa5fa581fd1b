"""The sidecar: registration agent, local health probe and the mesh's DNS responder."""
