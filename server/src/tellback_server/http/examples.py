"""Example request bodies for the OpenAPI document (what a generated client shows)."""

from __future__ import annotations

from typing import Any

SESSION_CREATE: dict[str, Any] = {
    "app_key": "tbk_3q7LbX0",
    "installation_id": "3f2c0a9e6a434b8e9d0b6f1b1d2f9a11",
    "device": {
        "platform": "ios",
        "model": "iPhone16,1",
        "os_version": "18.2",
        "app_version": "2.3.1",
        "locale": "de_DE",
        "sdk": "tellback-swift/0.1.0",
    },
}

ME_UPDATE: dict[str, Any] = {"name": "Ada", "attributes": {"plan": "pro", "orders": 12}}

AGENT_CREATE: dict[str, Any] = {
    "name": "Ada",
    "email": "ada@example.com",
    "app_ids": ["01934f6e-8f3a-7c2e-9d1b-0a2b3c4d5e6f"],
}

CONVERSATION_CREATE: dict[str, Any] = {
    "body": "Checkout does nothing after I change the address",
    "subject": "Checkout stuck",
    "category": "bug",
    "tags": ["checkout"],
    "custom_fields": {"order_id": "A-1042"},
    "context": {
        "app": {"version": "2.3.1"},
        "device": {"model": "iPhone16,1", "os_version": "18.2"},
        "network": {"type": "wifi"},
    },
    "attachment_ids": ["01934f6e-9a10-7b44-8c2d-1e2f3a4b5c6d"],
    "location": {"latitude": 52.52, "longitude": 13.405, "accuracy_m": 15},
}

MESSAGE_CREATE: dict[str, Any] = {"body": "It happens on Wi-Fi too"}

READ_MARKER: dict[str, Any] = {"up_to_message_id": "01934f6f-0b1c-7d2e-8f3a-4b5c6d7e8f90"}

AGENT_REPLY: dict[str, Any] = {"body": "Thanks! Fixed in 2.3.2, out today.", "internal": False}

CONVERSATION_UPDATE: dict[str, Any] = {"status": "solved", "tags": ["checkout", "fixed-2.3.2"]}

DEVICE_REGISTER: dict[str, Any] = {
    "provider": "apns",
    "token": "80a4c3…hex…",
    "apns_environment": "production",
    "locale": "de_DE",
    "app_version": "2.3.1",
}

UPLOAD_CREATE: dict[str, Any] = {
    "kind": "photo",
    "filename": "IMG_0001.JPG",
    "content_type": "image/jpeg",
    "size": 2451200,
}

APP_CREATE: dict[str, Any] = {
    "name": "Shop",
    "bundle_id": "com.example.shop",
    "android_package": "com.example.shop",
}

WEBHOOK_CREATE: dict[str, Any] = {
    "url": "https://helpdesk.example.com/hooks/tellback",
    "events": ["conversation.created", "message.created"],
    "description": "helpdesk",
}
