"""`devstral agent`: a coding agent with the tools Devstral was trained on (OpenHands' execute_bash,
str_replace_editor, think, finish), confined to a workspace.

Importing this package does not import torch: the in-process model loads devstral lazily.
"""

from devstral.agent.agent import Agent, AgentLimits
from devstral.agent.endpoint_model import EndpointChatModel
from devstral.agent.exceptions import AgentStop, Finished, LimitReached
from devstral.agent.model import ChatModel, ChatReply
from devstral.agent.policy import ApprovalRequest, Decision, Mode, Policy
from devstral.agent.secrets import SecretMasker
from devstral.agent.tools import SandboxOptions, ToolBox, ToolLimits
from devstral.agent.trajectory import TrajectoryWriter
from devstral.agent.workspace import Workspace

__all__ = [
    "Agent", "AgentLimits", "AgentStop", "ApprovalRequest", "ChatModel", "ChatReply", "Decision",
    "EndpointChatModel", "Finished", "LimitReached", "Mode", "Policy", "SandboxOptions", "SecretMasker", "ToolBox",
    "ToolLimits", "TrajectoryWriter", "Workspace",
]
